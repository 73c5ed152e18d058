//! `cinflow demo`: the embedded default a new user runs first. Everything stays
//! in one local folder; no broker, no object store, no downloads.
//!
//! synthetic images -> tiny backbone exported by tools/export_backbone.py ->
//! head trained with tch on some synthetic patients (`cinflow train`: report and
//! registry in the same folder) -> the locked test patients' images graded with
//! heatmaps, a summary and the held-out accuracy. Built without the `train`
//! feature, the head is a closed-form fit (`fit-head`) instead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::{classify, ClassifyOptions};
use crate::engine::GraderConfig;
use crate::infer::InferConfig;
use crate::model::Bundle;
use crate::pipeline::Drawing;
use crate::train::{read_labels, LabelRow};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Folder for everything the demo writes.
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// Number of synthetic images (80 patients of 3 images by default).
    #[arg(long, default_value_t = 240)]
    pub n: usize,
    /// Synthetic image size (the scanner size of the research data).
    #[arg(long, default_value = "2560x1920", value_parser = super::inputs::parse_size)]
    pub size: (u32, u32),
    /// Seed of the synthetic data and the tiny backbone (`--seed` seeds training).
    #[arg(long, default_value_t = 7)]
    pub data_seed: u64,
    /// Fraction of each grade's patients held out from training and graded (the
    /// locked test split).
    #[arg(long, default_value_t = 0.25)]
    pub holdout: f64,
    /// Use this bundle's backbone instead of exporting the tiny one.
    #[arg(long)]
    pub backbone: Option<PathBuf>,
    /// Export the tiny backbone with random weights instead of training it on
    /// other synthetic patients first (the plumbing without learned features).
    #[arg(long)]
    pub random_backbone: bool,
    /// Synthetic images the tiny backbone is trained on (patients of their
    /// own, never graded by the demo).
    #[arg(long, default_value_t = 120)]
    pub backbone_images: usize,
    /// Python interpreter with torch and onnx (the project's virtual environment).
    #[arg(long, env = "CINFLOW_PYTHON", default_value = ".venv/bin/python")]
    pub python: PathBuf,
    /// The export tool.
    #[arg(long, default_value = "tools/export_backbone.py")]
    pub export_tool: PathBuf,
    #[command(flatten)]
    pub hyper: crate::train::HyperParams,
    #[command(flatten)]
    pub infer: InferConfig,
}

pub fn demo(a: &DemoArgs) -> anyhow::Result<crate::cli::Exit> {
    let data = a.out.join("data");
    let labels = data.join("labels.csv");
    // Reuse earlier synthetic data only if it is what these options would make.
    let reusable = read_labels(&labels).is_ok_and(|rows| {
        rows.len() == a.n && image::image_dimensions(&rows[0].path).ok() == Some(a.size)
    });
    if !reusable {
        let _ = std::fs::remove_dir_all(&data);
        eprintln!(
            "[1/4] generating {} synthetic images in {}",
            a.n,
            data.display()
        );
        let bar = crate::progress::progress_bar(a.n as u64, "synth");
        crate::synth::generate(
            &crate::synth::SynthOptions {
                out: data.clone(),
                n: a.n,
                width: a.size.0,
                height: a.size.1,
                seed: a.data_seed,
                format: crate::synth::SynthFormat::Jpeg,
                images_per_patient: 3,
            },
            Some(&bar),
        )?;
        bar.finish_and_clear();
    } else {
        eprintln!("[1/4] reusing synthetic images in {}", data.display());
    }
    let backbone = match &a.backbone {
        Some(b) => b.clone(),
        None => export_tiny(a)?,
    };
    let fitted = fit(a, &backbone, &labels)?;
    let held_out = fitted.held_out;
    let model_dir = fitted.model;
    eprintln!(
        "[4/4] grading {} held-out images of {} other patients",
        held_out.len(),
        patients(&held_out)
    );
    let results = a.out.join("results");
    let report = classify(&ClassifyOptions {
        model: model_dir.clone(),
        out: results.clone(),
        infer: a.infer.clone(),
        grader: GraderConfig::default(),
        drawing: Drawing::default(),
        in_flight: 0,
        inputs: held_out.iter().map(|r| r.path.clone()).collect(),
    })?;
    let truth: BTreeMap<String, String> = held_out
        .iter()
        .map(|r| (super::inputs::file_uri(&r.path), r.label.clone()))
        .collect();
    let correct = report
        .results
        .iter()
        .filter(|(_, r)| {
            r.predicted_class.is_some() && r.predicted_class == truth.get(&r.uri).cloned()
        })
        .count();
    let accuracy = correct as f64 / report.total.max(1) as f64;
    println!("cinflow demo (synthetic data, not clinical):");
    println!("  model:           {}", model_dir.display());
    println!("  training:        {}", fitted.summary);
    println!(
        "  held-out:        {correct}/{} correct ({:.1}%; chance is 25%) on unseen patients",
        report.total,
        100.0 * accuracy
    );
    if let Some(line) = triage_line(&report.results, &truth) {
        println!("  CIN2+ triage:    {line}");
    }
    println!(
        "  results:         {} (per image a JSON and a folder with the preprocessed image, raw maps and the predicted class's heatmap; summary.csv)",
        results.display()
    );
    println!(
        "  viewer:          {} (open in a browser: every image, any class's heatmap)",
        results.join("index.html").display()
    );
    if let Some(report) = fitted.report {
        println!("  report:          {}", report.display());
        if let Some(card) = report.parent().map(|d| d.join("model-card.md")) {
            println!("  model card:      {}", card.display());
        }
    }
    Ok(crate::cli::Exit::of_counts(report.total, report.failed))
}

/// How the held-out images were triaged, and how many of each were truly CIN2+.
fn triage_line(
    results: &[(String, crate::result::ImageResult)],
    truth: &BTreeMap<String, String>,
) -> Option<String> {
    use crate::model::Triage;
    let mut counts = [[0usize; 2]; 3];
    for (_, r) in results {
        let Some(triage) = r.triage else {
            continue;
        };
        let slot = match triage {
            Triage::Likely => 0,
            Triage::Refer => 1,
            Triage::Unlikely => 2,
        };
        let cin2 = matches!(truth.get(&r.uri).map(String::as_str), Some("CIN3" | "CIN2"));
        counts[slot][usize::from(!cin2)] += 1;
    }
    let total: usize = counts.iter().flatten().sum();
    (total > 0).then(|| {
        let part = |name: &str, c: [usize; 2]| format!("{name} {} ({} CIN2+)", c[0] + c[1], c[0]);
        format!(
            "{}, {}, {}",
            part("CIN2+ likely", counts[0]),
            part("refer", counts[1]),
            part("CIN2+ unlikely", counts[2])
        )
    })
}

/// The model the demo grades with and the images it has never seen.
struct Fitted {
    model: PathBuf,
    held_out: Vec<LabelRow>,
    summary: String,
    report: Option<PathBuf>,
}

/// Trains the head with tch: the locked test split is the held-out set, the
/// report lands in the bundle and in `<out>/report`, the version in `<out>/registry`.
#[cfg(feature = "train")]
fn fit(a: &DemoArgs, backbone: &Path, labels: &Path) -> anyhow::Result<Fitted> {
    let rows = read_labels(labels)?;
    eprintln!(
        "[3/4] training a head with tch on {} images of {} patients (features of 8 views, cached)",
        rows.len(),
        patients(&rows)
    );
    let version = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let opts = crate::train::TrainOptions {
        labels: labels.to_path_buf(),
        backbone: backbone.to_path_buf(),
        backbone_sha256: None,
        out: a.out.join("models").join(&version),
        classes: None,
        name: Some("cin-demo".into()),
        version: Some(version),
        validation_fraction: 0.2,
        test_fraction: a.holdout,
        feature_cache: Some(a.out.join("feature-cache")),
        registry: Some(a.out.join("registry")),
        alias: "current".into(),
        promotion: Default::default(),
        gallery: 12,
        hyper: a.hyper.clone(),
        infer: a.infer.clone(),
        signing: Default::default(),
        registry_store: None,
        feature_store: None,
        labels_uri: None,
        labels_rows: None,
    };
    let out = crate::train::train(&opts)?;
    let report = a.out.join("report");
    let _ = std::fs::remove_dir_all(&report);
    copy_dir(&out.report_dir, &report)?;
    let held_out = rows
        .into_iter()
        .filter(|r| out.test_images.contains(&r.path))
        .collect();
    Ok(Fitted {
        model: out.bundle.clone(),
        held_out,
        summary: format!(
            "tch head, {} features computed / {} cached; locked test {}; {}",
            out.features_computed,
            out.features_cached,
            out.test.headline(),
            out.decision.as_ref().map_or(String::new(), |d| format!(
                "{} in {}",
                if d.promoted {
                    "promoted"
                } else {
                    "not promoted"
                },
                a.out.join("registry").display()
            )),
        ),
        report: Some(report.join("report.html")),
    })
}

/// Without libtorch: a closed-form head on a patient split.
#[cfg(not(feature = "train"))]
fn fit(a: &DemoArgs, backbone: &Path, labels: &Path) -> anyhow::Result<Fitted> {
    use super::fit_head::{fit_head, FitHeadArgs};
    let data = labels.parent().unwrap_or(Path::new("."));
    let rows = read_labels(labels)?;
    let (fit, held_out) = split_by_patient(&rows, a.holdout);
    crate::train::write_labels(&data.join("fit.csv"), data, &fit)?;
    eprintln!(
        "[3/4] fitting a closed-form head on {} images of {} patients (built without tch)",
        fit.len(),
        patients(&fit)
    );
    let model = a.out.join("models").join("tiny-demo");
    let summary = fit_head(&FitHeadArgs {
        model: backbone.to_path_buf(),
        labels: data.join("fit.csv"),
        out: model.clone(),
        version: Some("demo-1".into()),
        batch_size: 4,
        infer: a.infer.clone(),
    })?;
    Ok(Fitted {
        model,
        held_out,
        summary: format!(
            "diagonal LDA head, fit accuracy {:.1}% on {} images",
            100.0 * summary.train_accuracy,
            summary.images
        ),
        report: None,
    })
}

#[cfg(feature = "train")]
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

fn patients(rows: &[LabelRow]) -> usize {
    rows.iter()
        .map(|r| &r.patient_id)
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// Holds out the last `fraction` of each label's patients (at least one), so both
/// parts see every grade and no patient is in both.
#[cfg_attr(feature = "train", allow(dead_code))]
pub fn split_by_patient(rows: &[LabelRow], fraction: f64) -> (Vec<LabelRow>, Vec<LabelRow>) {
    let mut by_label: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in rows {
        let v = by_label.entry(&r.label).or_default();
        if !v.contains(&r.patient_id.as_str()) {
            v.push(&r.patient_id);
        }
    }
    let mut held: std::collections::HashSet<&str> = Default::default();
    for pats in by_label.values() {
        let k = ((pats.len() as f64 * fraction).ceil() as usize)
            .clamp(1, pats.len().saturating_sub(1).max(1));
        held.extend(&pats[pats.len() - k..]);
    }
    rows.iter()
        .cloned()
        .partition(|r| !held.contains(r.patient_id.as_str()))
}

/// Seed of the synthetic patients the tiny backbone learns from: not the
/// demo's own (`--data-seed`), so none of them is graded.
const BACKBONE_DATA_SEED: u64 = 1000;
/// Size of the backbone's training images (half the scanner size: as good for
/// the tiny network, and four times cheaper to make).
const BACKBONE_DATA_SIZE: (u32, u32) = (1280, 960);

/// The tiny backbone: trained on synthetic patients of its own (torch, in the
/// export tool, about two minutes on 2 cores), or with random weights.
fn export_tiny(a: &DemoArgs) -> anyhow::Result<PathBuf> {
    let dir = a.out.join("models").join("tiny-export");
    let trained = |b: &Bundle| b.manifest.provenance.get("training").is_some();
    if let Ok(b) = Bundle::load(&dir) {
        if trained(&b) != a.random_backbone {
            eprintln!("[2/4] reusing the tiny backbone in {}", dir.display());
            return Ok(dir);
        }
    }
    let mut cmd = std::process::Command::new(&a.python);
    cmd.arg(&a.export_tool)
        .args(["--arch", "tiny", "--classes", "4", "--force"]);
    if a.random_backbone {
        eprintln!(
            "[2/4] exporting a tiny backbone with random weights (seed {}) to {}",
            a.data_seed,
            dir.display()
        );
        cmd.arg("--seed").arg(a.data_seed.to_string());
    } else {
        let data = a.out.join("backbone-data");
        let labels = data.join("labels.csv");
        let reusable = read_labels(&labels).is_ok_and(|rows| {
            rows.len() == a.backbone_images
                && image::image_dimensions(&rows[0].path).ok() == Some(BACKBONE_DATA_SIZE)
        });
        if !reusable {
            let _ = std::fs::remove_dir_all(&data);
            let bar = crate::progress::progress_bar(a.backbone_images as u64, "synth");
            crate::synth::generate(
                &crate::synth::SynthOptions {
                    out: data.clone(),
                    n: a.backbone_images,
                    width: BACKBONE_DATA_SIZE.0,
                    height: BACKBONE_DATA_SIZE.1,
                    seed: BACKBONE_DATA_SEED,
                    format: crate::synth::SynthFormat::Jpeg,
                    images_per_patient: 3,
                },
                Some(&bar),
            )?;
            bar.finish_and_clear();
        }
        eprintln!(
            "[2/4] training the tiny backbone on {} synthetic images of other patients ({}), then exporting it to {} (about 2 minutes)",
            a.backbone_images,
            data.display(),
            dir.display()
        );
        // One thread: the weights then depend on the seed alone.
        cmd.args(["--seed", "0", "--threads", "1", "--train-labels"])
            .arg(&labels);
    }
    let status = cmd.arg("--out").arg(&dir).status().with_context(|| {
        format!(
            "cannot run {} (run scripts/setup.sh first, or set CINFLOW_PYTHON)",
            a.python.display()
        )
    })?;
    anyhow::ensure!(
        status.success(),
        "{} failed ({status})",
        a.export_tool.display()
    );
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_patients_whole_and_every_label_on_both_sides() {
        let rows: Vec<LabelRow> = (0..24)
            .map(|i| LabelRow {
                line: i + 2,
                path: format!("{i}.jpg").into(),
                label: ["CIN3", "CIN2", "CIN1", "Non-neoplasm"][(i / 3) % 4].into(),
                patient_id: format!("P{}", i / 3),
                slide_id: None,
                signed_out: None,
            })
            .collect();
        let (fit, held) = split_by_patient(&rows, 0.34);
        let pf: std::collections::HashSet<_> = fit.iter().map(|r| &r.patient_id).collect();
        assert!(held.iter().all(|r| !pf.contains(&r.patient_id)));
        for l in ["CIN3", "CIN2", "CIN1", "Non-neoplasm"] {
            assert!(fit.iter().any(|r| r.label == l) && held.iter().any(|r| r.label == l));
        }
        assert_eq!(fit.len() + held.len(), rows.len());
    }
}
