//! The files of a training report, written inside the new bundle's `report/`:
//! `report.json`, `split.json` (the locked split, reused by the next retrain),
//! `data.csv` (which images trained which version), `validation_review.csv`
//! (the validation images' input quality), the PNG plots, `model-card.md` and
//! `report.html`.

use std::path::{Path, PathBuf};

use super::features::ExtractStats;
use super::head::TrainedHead;
use super::hyper::HyperParams;
use super::labels::LabelRow;
use super::split::{Split, SplitPlan};
use super::views::VIEW_NAMES;
use super::TrainError;
use crate::cam::{overlay, overlay_scale, upsample_bilinear, MapKind};
use crate::model::triage::cin2_plus_scores;
use crate::model::{Decision, ReferBand};
use crate::pipeline::Model;
use crate::report::levels::Levels;
use crate::report::{self, plots, Evaluation, GalleryItem};

/// Schema tag of `report.json`.
pub const REPORT_SCHEMA: &str = "cinflow.train-report/v1";

pub(super) struct ReportInput<'a> {
    pub dir: &'a Path,
    pub model: &'a Model,
    pub labels: &'a str,
    pub labels_sha256: &'a str,
    /// When the parent version was made: sign-outs after it are new.
    pub parent_created_at: &'a str,
    /// Row, class index, split and image sha256 of every labelled image.
    pub items: &'a [(&'a LabelRow, usize, Split, &'a str)],
    pub plan: &'a SplitPlan,
    pub stats: ExtractStats,
    pub cache_uri: &'a str,
    pub hyper: &'a HyperParams,
    pub trained: &'a TrainedHead,
    pub eval: &'a Evaluation,
    pub eval_tta: &'a Evaluation,
    pub calibration: &'a super::run::CalibrationReport,
    /// The CIN2+ triage thresholds stored in the bundle (validation split).
    pub refer_band: Option<&'a ReferBand>,
    /// Image, slide and patient level figures (locked test split).
    pub levels: &'a Levels,
    /// Per validation image: row, true class, calibrated probabilities (what
    /// the refer band was chosen on).
    pub validation: Vec<(&'a LabelRow, usize, &'a [f64])>,
    /// The validation review of each validation image (quality, largest map value).
    pub review: Vec<(&'a LabelRow, &'a super::review::Reviewed)>,
    /// Out-of-distribution distance of each test image (empty without an OOD model).
    pub ood_distances: Vec<f64>,
    /// Per test image: row, true class, probabilities of one view and of the 8-view mean.
    pub predictions: Vec<(&'a LabelRow, usize, &'a [f64], &'a [f64])>,
    pub decision: Option<&'a Decision>,
    pub gallery: usize,
    /// Feature extraction, head training and whole-run seconds.
    pub seconds: [f64; 3],
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn plot_err(e: plots::PlotError) -> TrainError {
    TrainError::Report(e.to_string())
}

/// Writes every report file and returns the path of `report.html`.
pub(super) fn write(r: &ReportInput) -> Result<PathBuf, TrainError> {
    std::fs::create_dir_all(r.dir).map_err(io(r.dir))?;
    let m = r.model.manifest();

    // Which images trained this version, and the locked split for the next one.
    let data_csv = r.dir.join("data.csv");
    let mut w = csv::Writer::from_path(&data_csv).map_err(|e| TrainError::Report(e.to_string()))?;
    let csv_err = |e: csv::Error| TrainError::Report(format!("{}: {e}", data_csv.display()));
    w.write_record(["path", "label", "patient_id", "split", "sha256"])
        .map_err(csv_err)?;
    for (row, _, split, sha) in r.items {
        w.write_record([
            row.path.display().to_string().as_str(),
            &row.label,
            &row.patient_id,
            split.name(),
            sha,
        ])
        .map_err(csv_err)?;
    }
    w.flush().map_err(io(&data_csv))?;
    let split_json = r.dir.join("split.json");
    std::fs::write(
        &split_json,
        serde_json::to_vec_pretty(r.plan).expect("split serialises"),
    )
    .map_err(io(&split_json))?;

    // The validation review, one row per image: the quality measurements and
    // flags behind the manifest's quality review, and each image's largest map value.
    let review_csv = r.dir.join("validation_review.csv");
    let mut w =
        csv::Writer::from_path(&review_csv).map_err(|e| TrainError::Report(e.to_string()))?;
    let csv_err = |e: csv::Error| TrainError::Report(format!("{}: {e}", review_csv.display()));
    w.write_record([
        "path",
        "focus",
        "tissue_fraction",
        "overexposed_fraction",
        "underexposed_fraction",
        "ood_distance",
        "flags",
        "map_max",
    ])
    .map_err(csv_err)?;
    for (row, v) in &r.review {
        let q = &v.quality;
        w.write_record([
            row.path.display().to_string(),
            format!("{:?}", q.measurements.focus),
            format!("{:?}", q.measurements.tissue_fraction),
            format!("{:?}", q.measurements.overexposed_fraction),
            format!("{:?}", q.measurements.underexposed_fraction),
            q.ood_distance.map(|d| format!("{d:?}")).unwrap_or_default(),
            q.flags
                .iter()
                .map(|f| f.check.as_str())
                .collect::<Vec<_>>()
                .join(";"),
            format!("{:?}", v.map_max),
        ])
        .map_err(csv_err)?;
    }
    w.flush().map_err(io(&review_csv))?;

    // Plots.
    plots::training_curves(&r.trained.curve, &r.dir.join("training_curves.png"))
        .map_err(plot_err)?;
    plots::roc_curves(r.eval, "ROC, locked test split", &r.dir.join("roc.png"))
        .map_err(plot_err)?;
    plots::roc_curves(
        r.eval_tta,
        "ROC, locked test split, mean of 8 views",
        &r.dir.join("roc_tta.png"),
    )
    .map_err(plot_err)?;
    plots::reliability_diagram(
        &r.calibration.before,
        &r.calibration.after,
        r.calibration.calibration.temperature,
        &r.dir.join("reliability.png"),
    )
    .map_err(plot_err)?;
    plots::confusion_matrix(
        r.eval,
        "Confusion matrix, locked test split",
        &r.dir.join("confusion.png"),
    )
    .map_err(plot_err)?;
    let gallery = gallery_items(r)?;
    plots::gallery(&gallery, 4, &r.dir.join("gallery.png")).map_err(plot_err)?;

    let count = |s: Split| r.items.iter().filter(|i| i.2 == s).count();
    let patients = |s: Split| {
        r.items
            .iter()
            .filter(|i| i.2 == s)
            .map(|i| i.0.patient_id.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    let splits: serde_json::Map<String, serde_json::Value> = Split::ALL
        .iter()
        .map(|&s| {
            (
                s.name().to_string(),
                serde_json::json!({
                    "images": count(s),
                    "patients": patients(s),
                    "images_per_class": m.classes.iter().enumerate().map(|(c, name)| {
                        (name.clone(), r.items.iter().filter(|i| i.2 == s && i.1 == c).count().into())
                    }).collect::<serde_json::Map<String, serde_json::Value>>(),
                }),
            )
        })
        .collect();
    let report = serde_json::json!({
        "schema": REPORT_SCHEMA,
        "created_at": m.created_at,
        "model": {
            "name": m.name,
            "version": m.version,
            "parent_version": m.parent_version,
            "architecture": m.architecture,
            "task": m.task,
            "classes": m.classes,
            "backbone_sha256": r.model.bundle.backbone_sha256(),
            "head_sha256": r.model.bundle.head_sha256(),
            "preprocess_version": m.preprocess.version,
        },
        "data": {
            "labels": r.labels,
            "labels_sha256": r.labels_sha256,
            "images": r.items.len(),
            "splits": splits,
            "signed_out": super::labels::signed_out_counts(
                &r.items.iter().map(|i| i.0).collect::<Vec<_>>(),
                Some(r.parent_created_at).filter(|t| !t.is_empty()),
            ),
            "record": "data.csv",
        },
        "split": {
            "seed": r.plan.seed,
            "fractions": r.plan.fractions,
            "unit": "patient",
            "stratified_by": "most severe grade of the patient's images",
            "kept_from_previous_model": r.plan.kept_from_previous,
            "file": "split.json",
        },
        "features": {
            "cache": r.cache_uri,
            "views": VIEW_NAMES,
            "computed": r.stats.computed,
            "cached": r.stats.cached,
            "seconds": r.seconds[0],
        },
        "hyper_parameters": r.hyper,
        "training": {
            "device": r.trained.device,
            "epochs_run": r.trained.curve.epochs.len(),
            "best_epoch": r.trained.curve.best_epoch,
            "stopped": r.trained.curve.stopped,
            "l2_selection": r.trained.selection,
            "seconds": r.seconds[1],
            "curve": r.trained.curve.epochs,
        },
        "calibration": {
            "method": r.calibration.calibration.method,
            "temperature": r.calibration.calibration.temperature,
            "fitted_on": r.calibration.calibration.fitted_on,
            "validation_images": r.calibration.calibration.images,
            "validation_nll_before": r.calibration.calibration.nll_before,
            "validation_nll_after": r.calibration.calibration.nll_after,
            "test_before": r.calibration.before,
            "test_after": r.calibration.after,
        },
        "evaluation": {
            "split": "test",
            "single_view": r.eval,
            "tta_mean_of_8_views": r.eval_tta,
        },
        "refer_band": r.refer_band,
        "ood": m.ood.as_ref().map(|spec| serde_json::json!({
            "threshold": spec.threshold,
            "percentile": spec.percentile,
            "fitted_on": spec.fitted_on,
            "training_images": spec.images,
            "threshold_from": spec.threshold_from,
            "shrinkage": spec.shrinkage,
            "test_images": r.ood_distances.len(),
            "test_flagged": r.ood_distances.iter().filter(|d| **d > spec.threshold).count(),
        })),
        "levels": r.levels,
        "overlay_scale": m.cam_scale,
        "quality_review": m.quality_review.as_ref().map(|q| {
            let mut v = serde_json::to_value(q).expect("review serialises");
            v["record"] = "validation_review.csv".into();
            v
        }),
        "backbone_weights": m.provenance["backbone_weights"],
        "predictions": r.predictions.iter().enumerate().map(|(k, (row, truth, p, ptta))| {
            let p_cin2 = cin2_plus_scores(&m.classes, &[p.to_vec()], &[])
                .map(|(scores, _)| scores[0]);
            serde_json::json!({
                "image": row.path.display().to_string(),
                "patient_id": row.patient_id,
                "slide_id": row.slide_id.as_deref().unwrap_or(&row.patient_id),
                "truth": truth,
                "probabilities": p,
                "probabilities_tta": ptta,
                "p_cin2_plus": p_cin2,
                "triage": p_cin2.and_then(|q| r.refer_band.map(|b| b.triage(q))),
                "ood_distance": r.ood_distances.get(k),
            })
        }).collect::<Vec<_>>(),
        "validation_predictions": r.validation.iter().map(|(row, truth, p)| serde_json::json!({
            "image": row.path.display().to_string(),
            "patient_id": row.patient_id,
            "truth": truth,
            "probabilities": p,
        })).collect::<Vec<_>>(),
        "gallery": gallery.iter().map(|g| serde_json::json!({
            "image": g.name, "truth": g.truth, "predicted": g.predicted, "probability": g.probability,
        })).collect::<Vec<_>>(),
        "promotion": r.decision,
        "plots": {
            "training_curves": "training_curves.png",
            "roc": "roc.png",
            "roc_tta": "roc_tta.png",
            "reliability": "reliability.png",
            "confusion": "confusion.png",
            "gallery": "gallery.png",
        },
        "seconds": r.seconds[2],
    });
    let report_json = r.dir.join("report.json");
    std::fs::write(
        &report_json,
        serde_json::to_string_pretty(&report).expect("report serialises") + "\n",
    )
    .map_err(io(&report_json))?;
    let card = r.dir.join("model-card.md");
    std::fs::write(&card, report::card::model_card(&report).markdown()).map_err(io(&card))?;
    let html = r.dir.join("report.html");
    report::write_html(&html, &report).map_err(io(&html))?;
    Ok(html)
}

/// Up to `gallery` test images, taken round-robin over the true classes, graded
/// by the new model with the heatmap of the predicted class.
fn gallery_items(r: &ReportInput) -> Result<Vec<GalleryItem>, TrainError> {
    let m = r.model.manifest();
    let mut by_class: Vec<Vec<(&LabelRow, usize)>> = vec![Vec::new(); m.classes.len()];
    for (row, class, split, _) in r.items {
        if *split == Split::Test {
            by_class[*class].push((row, *class));
        }
    }
    let mut picked = Vec::new();
    let mut i = 0;
    while picked.len() < r.gallery && by_class.iter().any(|c| c.len() > i) {
        for c in &by_class {
            if let (Some(row), true) = (c.get(i), picked.len() < r.gallery) {
                picked.push(*row);
            }
        }
        i += 1;
    }
    let mut out = Vec::with_capacity(picked.len());
    for (row, class) in picked {
        let bytes = std::fs::read(&row.path).map_err(io(&row.path))?;
        let prepared = r
            .model
            .prepare(&bytes)
            .map_err(|e| TrainError::Report(format!("{}: {e}", row.path.display())))?;
        let graded = r.model.grade(&[&prepared])?.remove(0);
        let maps = &graded.maps;
        let (w, h) = prepared.image.dimensions();
        let up = upsample_bilinear(
            maps.map(graded.predicted),
            maps.height,
            maps.width,
            h as usize,
            w as usize,
        );
        let (scale, _) = overlay_scale(m.cam_scale.as_ref(), MapKind::GradCam, &up);
        out.push(GalleryItem {
            overlay: overlay(&prepared.image, &up, scale),
            name: row
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            truth: m.classes[class].clone(),
            predicted: m.classes[graded.predicted].clone(),
            probability: graded.probabilities[graded.predicted],
        });
    }
    Ok(out)
}
