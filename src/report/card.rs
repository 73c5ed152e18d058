//! The model card of a version: what it is for, what it learned from, how well
//! it does at each level, how it decides and flags, and what it cannot do.
//! Built from the training report (`report.json`) so every figure is the
//! report's own; written as `model-card.md` in the version's `report/` and
//! shown at the top of `report.html`.

use std::fmt::Write as _;

use serde_json::Value;

/// A block of a card section.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    Paragraph(String),
    /// A warning a reader must not miss.
    Warning(String),
    List(Vec<String>),
    /// Header row, then rows.
    Table(Vec<String>, Vec<Vec<String>>),
}

/// A titled section of the card.
#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    pub title: String,
    pub blocks: Vec<Block>,
}

/// The card: a title and its sections, rendered as Markdown or HTML.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCard {
    pub title: String,
    pub sections: Vec<Section>,
}

fn num(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map(|f| format!("{f:.digits$}"))
        .unwrap_or_else(|| "n/a".into())
}

fn pct(v: &Value) -> String {
    v.as_f64()
        .map(|f| format!("{:.1}%", 100.0 * f))
        .unwrap_or_else(|| "n/a".into())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "n/a".into(),
        other => other.to_string(),
    }
}

/// A figure with its 95% interval: `82.0% (70.1% to 91.3%)` or `0.912 (0.85 to 0.97)`.
fn figure(f: &Value, as_pct: bool) -> String {
    let fmt = |v: &Value| if as_pct { pct(v) } else { num(v, 3) };
    match f["ci95"].as_array() {
        Some(c) if c.len() == 2 => {
            format!("{} ({} to {})", fmt(&f["value"]), fmt(&c[0]), fmt(&c[1]))
        }
        _ => fmt(&f["value"]),
    }
}

/// What the backbone's weights learned from, as a warning when they are not
/// fit for clinical use (random or synthetic).
fn weights_warning(weights: &str) -> Option<String> {
    let w = weights.to_ascii_lowercase();
    if w.contains("random") {
        Some(format!(
            "DEMONSTRATION MODEL, NOT FOR CLINICAL USE: the backbone has random weights ({weights}). Its grades and heatmaps carry no clinical meaning."
        ))
    } else if w.contains("synthetic") || w.contains("not clinical") {
        Some(format!(
            "DEMONSTRATION MODEL, NOT FOR CLINICAL USE: the backbone learned from synthetic images only ({weights}). Its grades and heatmaps carry no clinical meaning."
        ))
    } else {
        None
    }
}

/// The card of the training report `r` (a `cinflow.train-report/v1` value).
pub fn model_card(r: &Value) -> ModelCard {
    let m = &r["model"];
    let classes: Vec<String> = m["classes"]
        .as_array()
        .map(|c| c.iter().map(s).collect())
        .unwrap_or_default();
    let mut sections = Vec::new();

    // Intended use, with the warnings first.
    let mut blocks = Vec::new();
    let weights = r["backbone_weights"].as_str().unwrap_or("");
    if let Some(w) = weights_warning(weights) {
        blocks.push(Block::Warning(w));
    }
    blocks.push(Block::Paragraph(format!(
        "Decision support for cervical biopsy microscope images (H&E, imaged like the training images): grades each image as one of {} with calibrated probabilities, a CIN2+ triage (likely, refer, unlikely) and Grad-CAM heatmaps of the evidence. Its results are **preliminary**: they are for a pathologist to review and never a diagnosis on their own. Images that fail input quality control, or whose features are unlike the training images', are flagged and referred.",
        classes.join(", ")
    )));
    blocks.push(Block::List(vec![
        format!(
            "Model: {} version {} ({} classes, {}), created {}",
            s(&m["name"]),
            s(&m["version"]),
            classes.len(),
            s(&m["architecture"]),
            s(&r["created_at"])
        ),
        format!("Parent version: {}", s(&m["parent_version"])),
        format!(
            "Backbone: sha256 {}; weights: {}",
            s(&m["backbone_sha256"]),
            if weights.is_empty() {
                "not recorded"
            } else {
                weights
            }
        ),
        format!(
            "Head: linear layer on the pooled backbone features, sha256 {}",
            s(&m["head_sha256"])
        ),
        format!(
            "Preprocessing: {} (CLAHE on every channel, resize to the backbone's input)",
            s(&m["preprocess_version"])
        ),
    ]));
    sections.push(Section {
        title: "Intended use".into(),
        blocks,
    });

    // Data.
    let d = &r["data"];
    let mut header = vec!["split".to_string(), "patients".into(), "images".into()];
    header.extend(classes.iter().cloned());
    let rows = ["train", "validation", "test"]
        .iter()
        .map(|name| {
            let sp = &d["splits"][name];
            let mut row = vec![name.to_string(), s(&sp["patients"]), s(&sp["images"])];
            row.extend(
                classes
                    .iter()
                    .map(|c| s(&sp["images_per_class"][c.as_str()])),
            );
            row
        })
        .collect();
    sections.push(Section {
        title: "Data".into(),
        blocks: vec![
            Block::Paragraph(format!(
                "{} labelled images from `{}` (sha256 {}), split by patient (seed {}): validation chose the head's regularisation, the calibration, the CIN2+ thresholds and the quality and overlay statistics; the locked test split is only reported. Acquisition sites and scanners are not recorded in the labels.",
                s(&d["images"]),
                s(&d["labels"]),
                s(&d["labels_sha256"]),
                s(&r["split"]["seed"]),
            )),
            Block::Table(header, rows),
        ],
    });

    // Performance at each level.
    let mut blocks = Vec::new();
    let ev = &r["evaluation"]["single_view"];
    blocks.push(Block::Paragraph(format!(
        "Locked test split, one view per image: accuracy {}, macro AUC {}. 95% intervals from {} bootstrap replicates over the {} test patients.",
        figure(
            &serde_json::json!({"value": ev["accuracy"], "ci95": ev["accuracy_ci95"]}),
            true
        ),
        num(&ev["macro_auc"], 3),
        s(&r["levels"]["replicates"]),
        s(&r["levels"]["patients"]),
    )));
    if let Some(levels) = r["levels"]["levels"].as_array() {
        let header = [
            "level",
            "units",
            "accuracy",
            "kappa (quadratic)",
            "CIN2+ sensitivity at rule-out",
            "CIN2+ specificity at rule-in",
        ]
        .map(String::from)
        .to_vec();
        let rows = levels
            .iter()
            .map(|l| {
                vec![
                    s(&l["level"]),
                    s(&l["units"]),
                    figure(&l["accuracy"], true),
                    figure(&l["kappa_quadratic"], false),
                    figure(&l["rule_out"]["sensitivity"], true),
                    figure(&l["rule_in"]["specificity"], true),
                ]
            })
            .collect();
        blocks.push(Block::Table(header, rows));
    }
    let c = &r["calibration"];
    blocks.push(Block::Paragraph(format!(
        "Calibration: temperature {} fitted on {} validation images; expected calibration error on the test split {} before, {} after.",
        num(&c["temperature"], 3),
        s(&c["validation_images"]),
        num(&c["test_before"]["ece"], 3),
        num(&c["test_after"]["ece"], 3),
    )));
    sections.push(Section {
        title: "Performance".into(),
        blocks,
    });

    // Operating points.
    let b = &r["refer_band"];
    let blocks = if b.is_null() {
        vec![Block::Paragraph(
            "No CIN2+ refer band (a 2-class model, or a validation split without both CIN2+ and CIN1-or-less images): images are triaged by quality only.".into(),
        )]
    } else {
        vec![Block::List(vec![
            format!(
                "P(CIN2+) = the calibrated probability of {}",
                b["classes"]
                    .as_array()
                    .map(|c| c.iter().map(s).collect::<Vec<_>>().join(" + "))
                    .unwrap_or_default()
            ),
            format!(
                "Rule-out threshold {}: below it, CIN2+ unlikely (validation sensitivity {}, specificity {})",
                num(&b["rule_out"]["threshold"], 4),
                pct(&b["rule_out"]["sensitivity"]),
                pct(&b["rule_out"]["specificity"]),
            ),
            format!(
                "Rule-in threshold {}: at or above it, CIN2+ likely (validation sensitivity {}, specificity {})",
                num(&b["rule_in"]["threshold"], 4),
                pct(&b["rule_in"]["sensitivity"]),
                pct(&b["rule_in"]["specificity"]),
            ),
            "In between: refer. A slide takes the grade of its image with the highest P(CIN2+)."
                .into(),
        ])]
    };
    sections.push(Section {
        title: "Operating points".into(),
        blocks,
    });

    // Quality control.
    let q = &r["quality_review"];
    let mut blocks = Vec::new();
    if !q.is_null() {
        let t = &q["thresholds"];
        let flagged = |c: &str| q["flagged"][c].as_u64().unwrap_or(0);
        // Median (1st to 99th percentile): the review's percentiles 1, 5, 50, 95, 99.
        // Rows: label, measurement, check name, bound, limit, and their digits.
        let spread = |name: &str, d: usize| {
            let p = |k: usize| num(&q[name][k], d);
            format!("{} ({} to {})", p(2), p(0), p(4))
        };
        let mut rows: Vec<Vec<String>> = [
            (
                "focus (Laplacian variance)",
                "focus",
                "focus",
                "at least",
                "min_focus",
                1,
                1,
            ),
            (
                "tissue fraction",
                "tissue_fraction",
                "tissue",
                "at least",
                "min_tissue_fraction",
                2,
                3,
            ),
            (
                "over-exposed fraction",
                "overexposed_fraction",
                "overexposed",
                "at most",
                "max_overexposed_fraction",
                2,
                3,
            ),
            (
                "under-exposed fraction",
                "underexposed_fraction",
                "underexposed",
                "at most",
                "max_underexposed_fraction",
                2,
                3,
            ),
        ]
        .into_iter()
        .map(
            |(label, measure, check, bound, limit, limit_digits, digits)| {
                vec![
                    label.to_string(),
                    format!("{bound} {}", num(&t[limit], limit_digits)),
                    spread(measure, digits),
                    flagged(check).to_string(),
                ]
            },
        )
        .collect();
        rows.extend([
            vec![
                "size, aspect".into(),
                format!(
                    "shortest side at least {} px, aspect at most {}",
                    s(&t["min_side"]),
                    num(&t["max_aspect"], 1)
                ),
                "".into(),
                (flagged("size") + flagged("aspect")).to_string(),
            ],
            vec![
                "out of distribution".into(),
                format!(
                    "Mahalanobis distance at most {}",
                    num(&r["ood"]["threshold"], 2)
                ),
                "".into(),
                flagged("ood").to_string(),
            ],
        ]);
        blocks.push(Block::Table(
            [
                "check",
                "limit",
                "validation median (1st to 99th percentile)",
                "validation images flagged",
            ]
            .map(String::from)
            .to_vec(),
            rows,
        ));
        blocks.push(Block::Paragraph(format!(
            "{} of the {} validation images fail at least one check. A limit that flags many images like the training ones is too strict for this scanner: set the bundle's `quality` limits.",
            s(&q["flagged_images"]),
            s(&q["images"]),
        )));
    }
    let o = &r["overlay_scale"];
    blocks.push(Block::Paragraph(if o.is_null() {
        "Heatmaps: each overlay is scaled to its own map's maximum (no version scale), so overlays do not compare across classes or images.".into()
    } else {
        format!(
            "Heatmaps: every overlay is drawn on this version's scale, full red at a map value of {} (Grad-CAM) or {} (class-contrastive), the {}th percentile of the maps of {} validation images, so a faint class looks faint.",
            num(&o["grad_cam"], 3),
            num(&o["contrastive"], 3),
            num(&o["percentile"], 0),
            s(&o["images"]),
        )
    }));
    sections.push(Section {
        title: "Quality control and heatmaps".into(),
        blocks,
    });

    // Known limitations.
    let test_n = ev["n"].as_u64().unwrap_or(0);
    let mut limits = vec![
        "Grades one image at a time at the training magnification; it does not see the whole slide, the clinical history or p16 immunohistochemistry.".to_string(),
        "Validated only on the lab's own images listed above; performance on another scanner, stain or site is unknown until measured there.".into(),
        "The validation split tunes the regularisation, calibration and thresholds, so its figures are optimistic; the locked test split's are not.".into(),
        "Heatmaps show where the linear head found evidence in the backbone's features, not a segmentation of the lesion.".into(),
    ];
    if test_n < 100 {
        limits.push(format!(
            "The test split has {test_n} images: the intervals above are wide and the figures uncertain."
        ));
    }
    if let Some(w) = weights_warning(weights) {
        limits.insert(0, w);
    }
    sections.push(Section {
        title: "Known limitations".into(),
        blocks: vec![Block::List(limits)],
    });

    ModelCard {
        title: format!("Model card: {} {}", s(&m["name"]), s(&m["version"])),
        sections,
    }
}

fn md_cell(c: &str) -> String {
    c.replace('|', "\\|").replace('\n', " ")
}

impl ModelCard {
    /// The card as Markdown (GitHub-flavoured tables).
    pub fn markdown(&self) -> String {
        let mut o = format!("# {}\n", self.title);
        for sec in &self.sections {
            let _ = write!(o, "\n## {}\n", sec.title);
            for b in &sec.blocks {
                o.push('\n');
                match b {
                    Block::Paragraph(p) => {
                        let _ = writeln!(o, "{p}");
                    }
                    Block::Warning(w) => {
                        let _ = writeln!(o, "> **Warning.** {w}");
                    }
                    Block::List(items) => {
                        for i in items {
                            let _ = writeln!(o, "- {i}");
                        }
                    }
                    Block::Table(header, rows) => {
                        let _ = writeln!(
                            o,
                            "| {} |",
                            header
                                .iter()
                                .map(|h| md_cell(h))
                                .collect::<Vec<_>>()
                                .join(" | ")
                        );
                        let _ = writeln!(o, "|{}", " --- |".repeat(header.len()));
                        for r in rows {
                            let _ = writeln!(
                                o,
                                "| {} |",
                                r.iter().map(|c| md_cell(c)).collect::<Vec<_>>().join(" | ")
                            );
                        }
                    }
                }
            }
        }
        o
    }

    /// The card as an HTML fragment (a `<section>`), with `**bold**` and
    /// `` `code` `` of the Markdown kept.
    pub fn html(&self) -> String {
        let inline = |t: &str| -> String {
            let e = super::html::esc(t);
            let mut out = String::new();
            for (k, part) in e.split('`').enumerate() {
                if k % 2 == 1 {
                    let _ = write!(out, "<code>{part}</code>");
                } else {
                    for (j, p) in part.split("**").enumerate() {
                        if j % 2 == 1 {
                            let _ = write!(out, "<b>{p}</b>");
                        } else {
                            out.push_str(p);
                        }
                    }
                }
            }
            out
        };
        let mut o = format!(
            "<section class=\"card\" id=\"model-card\"><h2>{}</h2>",
            inline(&self.title)
        );
        for sec in &self.sections {
            let _ = write!(o, "<h3>{}</h3>", inline(&sec.title));
            for b in &sec.blocks {
                match b {
                    Block::Paragraph(p) => {
                        let _ = write!(o, "<p>{}</p>", inline(p));
                    }
                    Block::Warning(w) => {
                        let _ = write!(o, "<p class=\"warning\"><b>Warning.</b> {}</p>", inline(w));
                    }
                    Block::List(items) => {
                        o.push_str("<ul>");
                        for i in items {
                            let _ = write!(o, "<li>{}</li>", inline(i));
                        }
                        o.push_str("</ul>");
                    }
                    Block::Table(header, rows) => {
                        o.push_str("<table><tr>");
                        for h in header {
                            let _ = write!(o, "<th>{}</th>", inline(h));
                        }
                        o.push_str("</tr>");
                        for r in rows {
                            o.push_str("<tr>");
                            for c in r {
                                let _ = write!(o, "<td>{}</td>", inline(c));
                            }
                            o.push_str("</tr>");
                        }
                        o.push_str("</table>");
                    }
                }
            }
        }
        o.push_str("</section>");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Value {
        serde_json::json!({
            "created_at": "2026-11-30T00:00:00Z",
            "backbone_weights": "random-init seed 0",
            "model": {"name": "cin", "version": "v2", "parent_version": "v1", "architecture": "tiny",
                      "classes": ["CIN3", "CIN2", "CIN1", "Non-neoplasm"], "backbone_sha256": "ab", "head_sha256": "cd",
                      "preprocess_version": "p1"},
            "data": {"labels": "labels.csv", "labels_sha256": "ef", "images": 10,
                     "splits": {"test": {"images": 4, "patients": 2, "images_per_class": {"CIN3": 1, "CIN2": 1, "CIN1": 1, "Non-neoplasm": 1}}}},
            "split": {"seed": 3},
            "evaluation": {"single_view": {"n": 4, "accuracy": 0.75, "accuracy_ci95": [0.3, 0.95], "macro_auc": 0.9}},
            "levels": {"replicates": 2000, "patients": 2, "levels": [
                {"level": "image", "units": 4, "accuracy": {"value": 0.75, "ci95": [0.5, 1.0]},
                 "kappa_quadratic": {"value": 0.8, "ci95": [0.6, 1.0]},
                 "rule_out": {"sensitivity": {"value": 1.0, "ci95": [1.0, 1.0]}},
                 "rule_in": {"specificity": {"value": 0.5, "ci95": null}}}]},
            "calibration": {"temperature": 1.5, "validation_images": 3, "test_before": {"ece": 0.2}, "test_after": {"ece": 0.1}},
            "refer_band": null,
            "quality_review": null,
            "overlay_scale": {"grad_cam": 2.5, "contrastive": 1.25, "percentile": 99.0, "images": 3},
        })
    }

    #[test]
    fn card_states_the_figures_and_warns_about_random_weights() {
        let card = model_card(&report());
        let md = card.markdown();
        assert!(md.starts_with("# Model card: cin v2\n"), "{md}");
        assert!(md.contains("> **Warning.** DEMONSTRATION MODEL, NOT FOR CLINICAL USE"));
        assert!(md.contains("| image | 4 | 75.0% (50.0% to 100.0%) | 0.800 (0.600 to 1.000) | 100.0% (100.0% to 100.0%) | 50.0% |"), "{md}");
        assert!(md.contains("| test | 2 | 4 | 1 | 1 | 1 | 1 |"), "{md}");
        assert!(md.contains("full red at a map value of 2.500 (Grad-CAM) or 1.250"));
        assert!(md.contains("Parent version: v1"));
        assert!(md.contains("The test split has 4 images"));
        let html = card.html();
        assert!(html.contains("<p class=\"warning\"><b>Warning.</b> DEMONSTRATION MODEL"));
        assert!(html.contains("<b>preliminary</b>"));
        assert!(!html.contains("**"));
    }

    #[test]
    fn real_weights_carry_no_warning() {
        let mut r = report();
        r["backbone_weights"] = "densenet161_cin4.pth sha256 12".into();
        let md = model_card(&r).markdown();
        assert!(!md.contains("NOT FOR CLINICAL USE"), "{md}");
    }
}
