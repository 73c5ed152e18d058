//! `report.html`: one self-contained page (the PNGs sit beside it) that shows a
//! training report the way a pathologist reads it: the decision first, then the
//! figures, then the numbers.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => esc(s),
        Value::Null => "n/a".into(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => {
                if f != 0.0 && f.abs() < 1e-3 {
                    format!("{f:e}")
                } else {
                    format!("{f:.4}")
                }
            }
            _ => n.to_string(),
        },
        other => esc(&other.to_string()),
    }
}

fn pct(v: &Value) -> String {
    v.as_f64()
        .map(|f| format!("{:.1}%", 100.0 * f))
        .unwrap_or_else(|| "n/a".into())
}

fn ci(v: &Value) -> String {
    match (
        v.get(0).and_then(Value::as_f64),
        v.get(1).and_then(Value::as_f64),
    ) {
        (Some(a), Some(b)) => format!("{:.1}% to {:.1}%", 100.0 * a, 100.0 * b),
        _ => "n/a".into(),
    }
}

/// Writes the page for a `cinflow.train-report/v1` JSON value to `path`.
pub fn write_html(path: &Path, r: &Value) -> std::io::Result<()> {
    let mut h = String::new();
    let model = &r["model"];
    let title = format!(
        "cinflow training report: {} {}",
        text(&model["name"]),
        text(&model["version"])
    );
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}}\
table{{border-collapse:collapse;margin:0.5em 0 1.5em}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}\
th:first-child,td:first-child{{text-align:left}}img{{max-width:100%;border:1px solid #ddd;margin:0.5em 0}}\
.decision{{padding:0.8em 1em;border-radius:6px;font-size:1.1em}}.yes{{background:#e3f4e3}}.no{{background:#fbe4e4}}\
.note{{color:#666;font-size:0.9em}}.warning{{background:#fbe4e4;padding:0.6em 1em;border-radius:6px}}.card{{border:1px solid #ccc;border-radius:6px;padding:0 1em;margin:1.5em 0}}</style></head><body><h1>{title}</h1><p><a href=\"#model-card\">Model card</a> (also <a href=\"model-card.md\">model-card.md</a>)</p>"
    );
    let _ = write!(
        h,
        "<p>{} classes ({}), backbone sha256 <code>{}</code>, trained from parent version {}, created {}.</p>",
        model["classes"].as_array().map_or(0, Vec::len),
        model["classes"]
            .as_array()
            .map(|c| c.iter().map(text).collect::<Vec<_>>().join(", "))
            .unwrap_or_default(),
        text(&model["backbone_sha256"]),
        text(&model["parent_version"]),
        text(&r["created_at"]),
    );

    let p = &r["promotion"];
    if p.is_null() {
        let _ = write!(
            h,
            "<p class=\"decision\">Not published to a registry (no promotion decision).</p>"
        );
    } else {
        let yes = p["promoted"].as_bool().unwrap_or(false);
        let _ = write!(
            h,
            "<p class=\"decision {}\"><b>{}</b> as <code>{}</code>: {}<br>Decided on the {} split (the locked test split below is \
only reported): new macro AUC {} vs current {} ({}), margin {}; CIN2+ sensitivity at the rule-out threshold {} vs current {}, margin {}{}.</p>",
            if yes { "yes" } else { "no" },
            if yes { "Promoted" } else { "Not promoted" },
            text(&p["alias"]),
            text(&p["reason"]),
            text(&p["split"]),
            text(&p["new_macro_auc"]),
            text(&p["current_macro_auc"]),
            text(&p["current_version"]),
            text(&p["margin"]),
            text(&p["new_cin2_sensitivity"]),
            text(&p["current_cin2_sensitivity"]),
            text(&p["sensitivity_margin"]),
            match p["anchor"]["version"].as_str() {
                Some(v) => format!(
                    "; anchor {} (the version no promotion may fall a margin below): macro AUC {}, sensitivity {}",
                    esc(v),
                    text(&p["anchor"]["figures"]["macro_auc"]),
                    text(&p["anchor"]["figures"]["cin2_sensitivity"])
                ),
                None => String::new(),
            },
        );
    }

    let ev = &r["evaluation"]["single_view"];
    let tta = &r["evaluation"]["tta_mean_of_8_views"];
    let _ = write!(
        h,
        "<h2>Locked test split</h2><table><tr><th></th><th>images</th><th>accuracy</th><th>95% CI</th><th>macro AUC</th></tr>\
<tr><td>one view</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\
<tr><td>mean of 8 views (TTA)</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>",
        text(&ev["n"]),
        pct(&ev["accuracy"]),
        ci(&ev["accuracy_ci95"]),
        text(&ev["macro_auc"]),
        text(&tta["n"]),
        pct(&tta["accuracy"]),
        ci(&tta["accuracy_ci95"]),
        text(&tta["macro_auc"]),
    );
    let _ = write!(
        h,
        "<img src=\"confusion.png\" alt=\"confusion matrix\"><img src=\"roc.png\" alt=\"ROC curves\">\
<img src=\"roc_tta.png\" alt=\"ROC curves, mean of 8 views\">"
    );
    let c = &r["calibration"];
    let _ = write!(
        h,
        "<h3>Calibration</h3><p>Probabilities are temperature-scaled: the head's logits are divided by \
T = {} before the softmax, fitted on the {} validation images (mean negative log-likelihood {} before, \
{} after). On the locked test split the expected calibration error (10 bins of the highest \
probability) is {} before and {} after; the predicted class and the heatmaps do not change.</p>\
<img src=\"reliability.png\" alt=\"reliability diagram before and after calibration\">",
        text(&c["temperature"]),
        text(&c["validation_images"]),
        text(&c["validation_nll_before"]),
        text(&c["validation_nll_after"]),
        text(&c["test_before"]["ece"]),
        text(&c["test_after"]["ece"]),
    );
    write_triage(&mut h, r);
    let _ = write!(
        h,
        "<h3>Per class (locked test split, images)</h3><table><tr><th>class</th><th>images</th><th>sensitivity</th><th>specificity</th><th>precision</th><th>F1</th><th>AUC</th><th>AUC 95% CI</th></tr>"
    );
    let per = ev["per_class"].as_array().cloned().unwrap_or_default();
    let roc = ev["roc"].as_array().cloned().unwrap_or_default();
    for (c, rc) in per
        .iter()
        .zip(roc.iter().chain(std::iter::repeat(&Value::Null)))
    {
        let auc_ci = match rc["auc_ci95"].as_array() {
            Some(a) if a.len() == 2 => format!("{} to {}", text(&a[0]), text(&a[1])),
            _ => "n/a".into(),
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            text(&c["class"]),
            text(&c["support"]),
            pct(&c["sensitivity"]),
            pct(&c["specificity"]),
            pct(&c["precision"]),
            text(&c["f1"]),
            text(&rc["auc"]),
            auc_ci
        );
    }
    let _ = write!(h, "</table>");

    let _ = write!(
        h,
        "<h2>Grad-CAM gallery</h2><p class=\"note\">Test images with the heatmap of the predicted class on this version's overlay scale; green border: correct, red: wrong.</p>\
<img src=\"gallery.png\" alt=\"Grad-CAM gallery\">"
    );

    let t = &r["training"];
    let _ = write!(
        h,
        "<h2>Training</h2><p>{} epochs on {}; kept the weights of epoch {} (lowest validation loss); {}.</p>\
<img src=\"training_curves.png\" alt=\"loss and accuracy per epoch\">",
        text(&t["epochs_run"]),
        text(&t["device"]),
        text(&t["best_epoch"]),
        text(&t["stopped"]),
    );
    let _ = write!(h, "<h3>Hyper-parameters</h3><table>");
    if let Some(hp) = r["hyper_parameters"].as_object() {
        for (k, v) in hp {
            let _ = write!(h, "<tr><td>{}</td><td>{}</td></tr>", esc(k), text(v));
        }
    }
    let _ = write!(h, "</table>");

    let d = &r["data"];
    let f = &r["features"];
    let s = &r["split"];
    let _ = write!(
        h,
        "<h2>Data</h2><p>{} images from <code>{}</code> (sha256 <code>{}</code>), split by patient \
(seed {}; {} patients kept the split of the previous model). Every image and its split: <a href=\"data.csv\">data.csv</a>.</p><table><tr><th>split</th><th>images</th><th>patients</th></tr>",
        text(&d["images"]),
        text(&d["labels"]),
        text(&d["labels_sha256"]),
        text(&s["seed"]),
        text(&s["kept_from_previous_model"]),
    );
    if let Some(sp) = d["splits"].as_object() {
        for (k, v) in sp {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(k),
                text(&v["images"]),
                text(&v["patients"])
            );
        }
    }
    let _ = write!(h, "</table>");
    let so = &d["signed_out"];
    if so["cases"].as_u64().unwrap_or(0) > 0 {
        let _ = write!(
            h,
            "<p>Signed out by the LIS: {} cases ({} images) in the manifest; <b>{} cases ({} images) added since the parent version</b> (created {}).</p>",
            text(&so["cases"]),
            text(&so["images"]),
            text(&so["added_since_parent"]["cases"]),
            text(&so["added_since_parent"]["images"]),
            text(&so["parent_created_at"]),
        );
    }
    let _ = write!(
        h,
        "<p>Features of 8 views per image: {} computed, {} from the cache at <code>{}</code>.</p>",
        text(&f["computed"]),
        text(&f["cached"]),
        text(&f["cache"]),
    );
    write_quality(&mut h, r);
    h.push_str(&super::card::model_card(r).html());
    h.push_str(
        "<p class=\"note\">All numbers: <a href=\"report.json\">report.json</a>.</p></body></html>\n",
    );
    std::fs::write(path, h)
}

/// A figure with its bootstrap interval: "87.5% (70.0% to 100.0%)".
fn figure(f: &Value, as_pct: bool) -> String {
    let v = &f["value"];
    let shown = if as_pct { pct(v) } else { text(v) };
    match f["ci95"].as_array() {
        Some(c) if c.len() == 2 && as_pct => format!("{shown} ({})", ci(&f["ci95"])),
        Some(c) if c.len() == 2 => format!(
            "{shown} ({:.3} to {:.3})",
            c[0].as_f64().unwrap_or(f64::NAN),
            c[1].as_f64().unwrap_or(f64::NAN)
        ),
        _ => shown,
    }
}

/// The validation review: input quality of the validation images against the
/// limits, and the overlay scale.
fn write_quality(h: &mut String, r: &Value) {
    let q = &r["quality_review"];
    if q.is_null() {
        return;
    }
    let _ = write!(
        h,
        "<h2>Input quality of the validation images</h2><p>{} of the {} validation images fail at least one quality check (<a href=\"validation_review.csv\">validation_review.csv</a> has each image's measurements).</p>\
<table><tr><th>measurement</th><th>1st</th><th>5th</th><th>median</th><th>95th</th><th>99th percentile</th></tr>",
        text(&q["flagged_images"]),
        text(&q["images"]),
    );
    for name in [
        "focus",
        "tissue_fraction",
        "overexposed_fraction",
        "underexposed_fraction",
    ] {
        let _ = write!(h, "<tr><td>{name}</td>");
        for k in 0..5 {
            let _ = write!(h, "<td>{}</td>", text(&q[name][k]));
        }
        h.push_str("</tr>");
    }
    h.push_str("</table><table><tr><th>check</th><th>validation images flagged</th></tr>");
    if let Some(f) = q["flagged"].as_object() {
        for (check, n) in f {
            let _ = write!(h, "<tr><td>{}</td><td>{}</td></tr>", esc(check), text(n));
        }
    }
    h.push_str("</table>");
}

/// The CIN2+ refer band (validation split) and the image, slide and patient
/// figures (locked test split).
fn write_triage(h: &mut String, r: &Value) {
    let b = &r["refer_band"];
    if !b.is_null() {
        let _ = write!(
            h,
            "<h3>CIN2+ triage (thresholds from the validation split)</h3><p>P(CIN2+) is the sum of the calibrated probabilities of {}. Two thresholds were chosen on the {} {} images ({} CIN2+, {} CIN1 or less): below the <b>rule-out</b> threshold {} an image is <i>CIN2+ unlikely</i> (chosen for {} sensitivity; it reached {} sensitivity and {} specificity there); at or above the <b>rule-in</b> threshold {} it is <i>CIN2+ likely</i> (chosen for {} specificity; reached {} sensitivity, {} specificity); in between, <i>refer</i>. A slide or patient takes the highest P(CIN2+) of its images.</p>",
            b["classes"]
                .as_array()
                .map(|c| c.iter().map(text).collect::<Vec<_>>().join(" + "))
                .unwrap_or_default(),
            text(&Value::from(
                b["positives"].as_u64().unwrap_or(0) + b["negatives"].as_u64().unwrap_or(0),
            )),
            text(&b["fitted_on"]),
            text(&b["positives"]),
            text(&b["negatives"]),
            text(&b["rule_out"]["threshold"]),
            pct(&b["rule_out"]["target"]),
            pct(&b["rule_out"]["sensitivity"]),
            pct(&b["rule_out"]["specificity"]),
            text(&b["rule_in"]["threshold"]),
            pct(&b["rule_in"]["target"]),
            pct(&b["rule_in"]["sensitivity"]),
            pct(&b["rule_in"]["specificity"]),
        );
    }
    let o = &r["ood"];
    if !o.is_null() {
        let _ = write!(
            h,
            "<h3>Out-of-distribution flag</h3><p>Served images whose pooled features lie farther from the {} \
training images' than a Mahalanobis distance of {} (the {}th percentile of the {} split's distances; Ledoit-Wolf \
shrinkage {}) are flagged as unlike the training data and referred. On the locked test split {} of {} images are beyond it.</p>",
            text(&o["training_images"]),
            text(&o["threshold"]),
            text(&o["percentile"]),
            text(&o["threshold_from"]),
            text(&o["shrinkage"]),
            text(&o["test_flagged"]),
            text(&o["test_images"]),
        );
    }
    let l = &r["levels"];
    let Some(levels) = l["levels"].as_array() else {
        return;
    };
    let _ = write!(
        h,
        "<h3>Image, slide and patient level (locked test split)</h3><p class=\"note\">95% intervals from {} bootstrap replicates over the {} test patients (a patient's images are not independent). Slides from the labels' <code>{}</code>.</p><table><tr><th>level</th><th>units</th><th>CIN2+</th><th>accuracy</th><th>kappa (quadratic)</th><th>sensitivity at rule-out</th><th>specificity at rule-out</th><th>sensitivity at rule-in</th><th>specificity at rule-in</th><th>likely / refer / unlikely (CIN2+)</th><th>likely / refer / unlikely (CIN1 or less)</th></tr>",
        text(&l["replicates"]),
        text(&l["patients"]),
        text(&l["slides_from"]),
    );
    for v in levels {
        let t = &v["triage"];
        let counts = |k: usize| {
            if t.is_null() {
                "n/a".to_string()
            } else {
                ["likely", "refer", "unlikely"]
                    .map(|n| text(&t[n][k]))
                    .join(" / ")
            }
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            text(&v["level"]),
            text(&v["units"]),
            text(&v["cin2_plus"]),
            figure(&v["accuracy"], true),
            figure(&v["kappa_quadratic"], false),
            figure(&v["rule_out"]["sensitivity"], true),
            figure(&v["rule_out"]["specificity"], true),
            figure(&v["rule_in"]["sensitivity"], true),
            figure(&v["rule_in"]["specificity"], true),
            counts(0),
            counts(1),
        );
    }
    let _ = write!(h, "</table>");
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_and_formats() {
        assert_eq!(super::esc("<a & \"b\">"), "&lt;a &amp; &quot;b&quot;&gt;");
        assert_eq!(super::text(&serde_json::json!(1e-5)), "1e-5");
        assert_eq!(super::text(&serde_json::json!(0.91234)), "0.9123");
        assert_eq!(super::pct(&serde_json::json!(0.5)), "50.0%");
    }
}
