//! `train`: one whole retraining run, from a labels file to a (maybe promoted)
//! bundle version with its report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::features::{extract, FeatureCache, ImageFeatures};
use super::head::{train_head, HeadData};
use super::labels::{read_labels, LabelRow};
use super::split::{self, Split, SplitFractions, SplitPlan};
use super::{TrainError, TrainOptions};
use crate::model::triage::{cin2_plus_rows, cin2_plus_scores};
use crate::model::{
    Bundle, Calibration, ClassScheme, Compared, Decision, Head, Manifest, PromotionFigures,
    ReferBand, Registry, Task, BACKBONE_FILE,
};
use crate::pipeline::Model;
use crate::report::{self, calibration, levels, operating, Evaluation};
use crate::storage::LocalStore;

/// What a training run produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub bundle: PathBuf,
    pub version: String,
    pub report_dir: PathBuf,
    pub test: Evaluation,
    pub test_tta: Evaluation,
    /// The locked test split's images, in evaluation order.
    pub test_images: Vec<PathBuf>,
    pub features_computed: usize,
    pub features_cached: usize,
    pub decision: Option<Decision>,
    /// The CIN2+ thresholds stored in the bundle (4- and 3-class models).
    pub refer_band: Option<ReferBand>,
    /// Image, slide and patient level figures on the locked test split.
    pub levels: levels::Levels,
}

/// One labelled image with everything the run knows about it.
struct Item {
    row: LabelRow,
    class: usize,
    split: Split,
    features: ImageFeatures,
}

/// Runs one retraining.
pub fn train(o: &TrainOptions) -> Result<TrainOutcome, TrainError> {
    let started = Instant::now();
    if let Some(p) = o.hyper.problems() {
        return Err(TrainError::Data(p));
    }
    let labels_name = o
        .labels_uri
        .clone()
        .unwrap_or_else(|| o.labels.display().to_string());
    let rows = match &o.labels_rows {
        Some(rows) => rows.clone(),
        None => read_labels(&o.labels)?,
    };

    // The frozen backbone, exactly as the inference workers load it.
    let (backbone_dir, _tmp) = backbone_bundle(o)?;
    let model = Model::load(&backbone_dir, &o.infer)?;
    let base = model.manifest().clone();
    if let Some(want) = &o.backbone_sha256 {
        let have = model.bundle.backbone_sha256();
        if !have.eq_ignore_ascii_case(want) {
            return Err(TrainError::Data(format!(
                "backbone {} has sha256 {have}, but {want} was required",
                model.bundle.backbone_path().display()
            )));
        }
    }
    let n_classes = o.classes.map(usize::from).unwrap_or(base.classes.len());
    let scheme = ClassScheme::from_count(n_classes).ok_or_else(|| {
        TrainError::Data(format!(
            "no class scheme with {n_classes} classes (use 4, 3 or 2)"
        ))
    })?;
    let classes: Vec<String> = scheme.classes().iter().map(|c| c.to_string()).collect();
    let task = if n_classes == 2 {
        Task::Binary
    } else {
        Task::Multiclass
    };
    let class_of = check_rows(&rows, &labels_name, scheme, &classes)?;

    // The registry's current model: its split is kept, and it is what the new
    // model must beat.
    let registry_store: Option<Arc<dyn crate::storage::ObjectStore>> =
        match (&o.registry_store, &o.registry) {
            (Some(store), _) => Some(store.clone()),
            (None, Some(dir)) => Some(Arc::new(LocalStore::new(dir))),
            (None, None) => None,
        };
    let registry = match registry_store {
        Some(store) => {
            let name = o.name.clone().unwrap_or_else(|| base.name.clone());
            let mut r = Registry::new(store, &name)?;
            if let Some(key) = o
                .signing
                .load()
                .map_err(crate::model::RegistryError::from)?
            {
                r = r.signing_with(key);
            }
            Some(r)
        }
        None => None,
    };
    if let (Some(r), Some(v)) = (&registry, &o.version) {
        r.check_new_version(v)?;
    }
    let scratch = tempfile::tempdir().map_err(|source| TrainError::Io {
        path: std::env::temp_dir().display().to_string(),
        source,
    })?;
    let (current, anchor) = match &registry {
        Some(r) => match r.alias(&o.alias)? {
            Some(a) => {
                let dir = scratch.path().join("current-model");
                let bundle = r.fetch(&a.version, &dir)?;
                let previous_split = r
                    .get_file(&a.version, "report/split.json")
                    .ok()
                    .and_then(|b| serde_json::from_slice::<SplitPlan>(&b).ok());
                // The anchor, when it is not the current version itself; a
                // recorded anchor that cannot be fetched blocks promotion.
                let anchor = a.anchor.filter(|v| *v != a.version).map(|v| {
                    let dir = scratch.path().join("anchor-model");
                    r.fetch(&v, &dir)
                        .map(|b| (b, dir))
                        .map_err(|e| format!("the anchor version {v} could not be fetched: {e}"))
                });
                (Some((bundle, previous_split, dir)), anchor)
            }
            None => (None, None),
        },
        None => (None, None),
    };

    // Patient-level split, locked across retrains.
    let mut patient_class: BTreeMap<String, usize> = BTreeMap::new();
    for (r, &c) in rows.iter().zip(&class_of) {
        let e = patient_class.entry(r.patient_id.clone()).or_insert(c);
        *e = (*e).min(c);
    }
    let fractions = SplitFractions {
        validation: o.validation_fraction,
        test: o.test_fraction,
    };
    let previous = current
        .as_ref()
        .and_then(|c| c.1.as_ref())
        .map(|p| &p.assignment);
    let plan = split::assign(&patient_class, n_classes, previous, fractions, o.hyper.seed)?;
    let assigned: Vec<(String, Split, usize)> = rows
        .iter()
        .zip(&class_of)
        .map(|(r, &c)| (r.patient_id.clone(), plan.assignment[&r.patient_id], c))
        .collect();
    split::check(&assigned, &classes)?;

    // Features of every view, through the cache.
    let cache_dir = o.feature_cache.clone().unwrap_or_else(|| {
        o.labels
            .parent()
            .unwrap_or(Path::new("."))
            .join(".cinflow-cache")
    });
    let cache = match &o.feature_store {
        Some((store, prefix)) => FeatureCache::new(store.clone(), prefix),
        None => FeatureCache::new(Arc::new(LocalStore::new(&cache_dir)), ""),
    };
    let bar = crate::progress::progress_bar(rows.len() as u64, "features");
    let t = Instant::now();
    let (features, stats) = extract(&model, &rows, &labels_name, &cache, Some(&bar))?;
    bar.finish_and_clear();
    let feature_seconds = t.elapsed().as_secs_f64();
    tracing::info!(
        computed = stats.computed,
        cached = stats.cached,
        seconds = feature_seconds,
        cache = %cache.uri(),
        "features: {} images through the backbone, {} from the cache",
        stats.computed,
        stats.cached
    );
    let items: Vec<Item> = rows
        .into_iter()
        .zip(class_of)
        .zip(features)
        .zip(&assigned)
        .map(|(((row, class), features), a)| Item {
            row,
            class,
            split: a.1,
            features,
        })
        .collect();
    let of = |s: Split| items.iter().filter(move |i| i.split == s);

    // Head training.
    let data = HeadData {
        task,
        classes: n_classes,
        train: of(Split::Train)
            .map(|i| i.features.views.as_slice())
            .collect(),
        train_labels: of(Split::Train).map(|i| i.class).collect(),
        val: of(Split::Validation)
            .map(|i| i.features.views[0].as_slice())
            .collect(),
        val_labels: of(Split::Validation).map(|i| i.class).collect(),
    };
    let bar = crate::progress::progress_bar(o.hyper.max_epochs as u64, "epochs");
    let t = Instant::now();
    let trained = train_head(&data, &o.hyper, Some(&bar))?;
    bar.finish_and_clear();
    let train_seconds = t.elapsed().as_secs_f64();
    tracing::info!(
        epochs = trained.curve.epochs.len(),
        best_epoch = trained.curve.best_epoch,
        device = %trained.device,
        seconds = train_seconds,
        "head trained: {}",
        trained.curve.stopped
    );

    // Temperature scaling, fitted on the validation split (identity view).
    let val: Vec<&Item> = of(Split::Validation).collect();
    let val_logits: Vec<Vec<f32>> = val
        .iter()
        .map(|i| trained.head.logits(&i.features.views[0]))
        .collect();
    let val_labels: Vec<usize> = val.iter().map(|i| i.class).collect();
    let temperature = calibration::fit_temperature(task, &val_logits, &val_labels);
    let calibrated = Calibration {
        method: "temperature".into(),
        temperature,
        fitted_on: "validation".into(),
        images: val.len(),
        nll_before: calibration::mean_nll(task, &val_logits, &val_labels, 1.0),
        nll_after: calibration::mean_nll(task, &val_logits, &val_labels, temperature),
    };
    tracing::info!(
        temperature,
        nll_before = calibrated.nll_before,
        nll_after = calibrated.nll_after,
        "calibrated on {} validation images",
        val.len()
    );

    // The CIN2+ refer band, on the same validation images (calibrated).
    let val_probabilities = predict(&trained.head, task, &val, false, temperature);
    let refer_band = fit_refer_band(&classes, &val_probabilities, &val_labels, &o.hyper);
    match &refer_band {
        Some(b) => tracing::info!(
            rule_out = b.rule_out.threshold,
            rule_in = b.rule_in.threshold,
            sensitivity = b.rule_out.sensitivity,
            specificity = b.rule_in.specificity,
            "CIN2+ refer band chosen on {} validation images",
            val.len()
        ),
        None if n_classes > 2 => tracing::warn!(
            "no CIN2+ refer band: the validation split lacks CIN2+ or CIN1-or-less images"
        ),
        None => {}
    }

    // The out-of-distribution model: training features, validation threshold.
    let fitted_ood = super::ood::fit_ood(
        &of(Split::Train)
            .map(|i| i.features.views[0].as_slice())
            .collect::<Vec<_>>(),
        &val.iter()
            .map(|i| i.features.views[0].as_slice())
            .collect::<Vec<_>>(),
    );
    if let Some((_, spec)) = &fitted_ood {
        tracing::info!(
            threshold = spec.threshold,
            shrinkage = spec.shrinkage,
            "out-of-distribution score fitted on {} training images, threshold the {}th percentile of validation",
            spec.images,
            spec.percentile
        );
    }

    // The validation review: the overlay scale and the validation images'
    // input quality, through the serving path with the new head.
    let reviewed = super::review::review(
        &model,
        &trained.head,
        task,
        fitted_ood.as_ref().map(|(m, s)| (m, s)),
        &val.iter().map(|i| &i.row).collect::<Vec<_>>(),
        &labels_name,
    )?;
    match &reviewed.cam_scale {
        Some(s) => tracing::info!("overlay scale: {}", super::review::describe(s)),
        None => tracing::warn!(
            "no overlay scale: the validation maps have no positive part; overlays use each map's maximum"
        ),
    }
    tracing::info!(
        flagged = reviewed.quality.flagged_images,
        images = reviewed.quality.images,
        "input quality of the validation images: {} of {} flagged",
        reviewed.quality.flagged_images,
        reviewed.quality.images
    );

    // Evaluation on the locked test split (calibrated probabilities): one
    // view, and the mean over 8 views; calibration before and after.
    let test: Vec<&Item> = of(Split::Test).collect();
    let test_images: Vec<PathBuf> = test.iter().map(|i| i.row.path.clone()).collect();
    let truth: Vec<usize> = test.iter().map(|i| i.class).collect();
    let single = predict(&trained.head, task, &test, false, temperature);
    let tta = predict(&trained.head, task, &test, true, temperature);
    let reliability = CalibrationReport {
        before: calibration::reliability(
            &predict(&trained.head, task, &test, false, 1.0),
            &truth,
            RELIABILITY_BINS,
        ),
        after: calibration::reliability(&single, &truth, RELIABILITY_BINS),
        calibration: calibrated.clone(),
    };
    let eval = report::evaluate(&classes, &truth, &single);
    let eval_tta = report::evaluate(&classes, &truth, &tta);
    // Image, slide and patient level, with patient-cluster bootstrap intervals.
    let slides_from = if test.iter().any(|i| i.row.slide_id.is_some()) {
        "slide_id"
    } else {
        "patient_id"
    };
    let cases: Vec<levels::Case> = test
        .iter()
        .zip(&single)
        .map(|(i, p)| levels::Case {
            patient: i.row.patient_id.clone(),
            slide: i
                .row
                .slide_id
                .clone()
                .unwrap_or_else(|| i.row.patient_id.clone()),
            truth: i.class,
            probabilities: p.clone(),
        })
        .collect();
    let by_level = levels::evaluate_levels(
        &cases,
        &classes,
        refer_band.as_ref(),
        &levels::Draws::Seeded {
            replicates: levels::BOOTSTRAP_REPLICATES,
            seed: o.hyper.seed,
        },
        slides_from,
    );

    // The new bundle version.
    let now = chrono::Utc::now();
    let version = o
        .version
        .clone()
        .unwrap_or_else(|| now.format("%Y%m%dT%H%M%SZ").to_string());
    let name = registry
        .as_ref()
        .map(|r| r.name().to_string())
        .or_else(|| o.name.clone())
        .unwrap_or_else(|| base.name.clone());
    let labels_sha = crate::hashing::sha256_file(&o.labels).map_err(|source| TrainError::Io {
        path: labels_name.clone(),
        source,
    })?;
    let per_split = split_summary(&items, &classes);
    let mut manifest: Manifest = base.clone();
    manifest.name = name;
    manifest.version = version.clone();
    manifest.task = task;
    manifest.classes = classes.clone();
    manifest.calibration = Some(calibrated);
    manifest.refer_band = refer_band.clone();
    manifest.ood = fitted_ood.as_ref().map(|(_, spec)| spec.clone());
    manifest.cam_scale = reviewed.cam_scale.clone();
    manifest.quality_review = Some(reviewed.quality.clone());
    manifest.parent_version = current
        .as_ref()
        .map(|c| c.0.manifest.version.clone())
        .or(Some(base.version.clone()));
    // Signed-out cases after this count as new to this version.
    let parent_created_at = current
        .as_ref()
        .map_or(base.created_at.clone(), |c| c.0.manifest.created_at.clone());
    manifest.created_at = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    manifest.provenance = serde_json::json!({
        "tool": "cinflow train",
        "head": match o.hyper.solver {
            super::Solver::Lbfgs => "linear layer on global-average-pooled backbone features: logistic regression on every view of the training images, solved with L-BFGS in libtorch (tch), L2 chosen on validation",
            super::Solver::Adam => "linear layer on global-average-pooled backbone features, trained with Adam in libtorch (tch) (the seed's schedule)",
        },
        "head_selection": trained.selection,
        "labels": labels_name,
        "labels_sha256": labels_sha,
        "images": items.len(),
        "patients": patient_class.len(),
        "splits": per_split,
        "split_seed": plan.seed,
        "data_record": "report/data.csv",
        "hyper_parameters": o.hyper,
        "best_epoch": trained.curve.best_epoch,
        "stopped": trained.curve.stopped,
        "device": trained.device,
        "backbone_from": {"name": base.name, "version": base.version, "sha256": model.bundle.backbone_sha256()},
        // What the backbone's weights learned from, carried from its bundle:
        // the model card warns when they are random or synthetic.
        "backbone_weights": base.provenance.get("backbone_weights").cloned().unwrap_or(serde_json::Value::Null),
    });
    manifest.metrics = serde_json::json!({
        "test_images": eval.n,
        "test_accuracy": eval.accuracy,
        "test_accuracy_ci95": eval.accuracy_ci95,
        "test_macro_auc": eval.macro_auc,
        "test_tta_accuracy": eval_tta.accuracy,
        "test_tta_macro_auc": eval_tta.macro_auc,
        "test_ece_before_calibration": reliability.before.ece,
        "test_ece": reliability.after.ece,
        "test_levels": by_level.levels.iter().map(|l| (l.level.clone(), serde_json::json!({
            "units": l.units,
            "kappa_quadratic": l.kappa_quadratic.value,
            "cin2plus_sensitivity_rule_out": l.rule_out.map(|r| r.sensitivity.value),
            "cin2plus_specificity_rule_in": l.rule_in.map(|r| r.specificity.value),
        }))).collect::<serde_json::Map<_, _>>(),
    });
    let staging = o.out.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    let mut staged = RemoveOnDrop(Some(staging.clone()));
    model.bundle.write_version(
        &staging,
        manifest,
        &trained.head,
        fitted_ood.as_ref().map(|(model, _)| model),
    )?;

    // Promotion compares the new model with the current one and the anchor on
    // the validation split (the locked test split is only reported).
    let decision = registry.as_ref().map(|_| {
        let mut incomparable = None;
        let mut compare = |role: &str, bundle: &Bundle, dir: &Path| -> Option<Compared> {
            let version = bundle.manifest.version.clone();
            if bundle.manifest.classes != classes {
                incomparable.get_or_insert(format!(
                    "the {role} model {version} has classes {:?}, the new model {:?}",
                    bundle.manifest.classes, classes
                ));
                return None;
            }
            match validation_figures(
                bundle,
                dir,
                &val,
                &val_labels,
                &classes,
                &model,
                &cache,
                o,
                &labels_name,
            ) {
                Ok(figures) => Some(Compared { version, figures }),
                Err(e) => {
                    incomparable.get_or_insert(format!(
                        "the {role} model {version} could not be evaluated: {e}"
                    ));
                    None
                }
            }
        };
        let current_figures = current
            .as_ref()
            .and_then(|(bundle, _, dir)| compare("current", bundle, dir));
        let anchor_figures = match &anchor {
            Some(Ok((bundle, dir))) => compare("anchor", bundle, dir),
            Some(Err(why)) => {
                incomparable.get_or_insert(why.clone());
                None
            }
            None => None,
        };
        let new_figures = figures_of(
            &classes,
            &val_labels,
            &val_probabilities,
            refer_band.as_ref(),
        );
        o.promotion.decide(
            &o.alias,
            &version,
            new_figures,
            current_figures.as_ref(),
            anchor_figures.as_ref(),
            incomparable.or_else(|| {
                (current.is_some() && current_figures.is_none())
                    .then(|| "the current model could not be evaluated".to_string())
            }),
        )
    });

    // The report, inside the bundle folder.
    let report_dir = staging.join("report");
    let new_model = Model::load(&staging, &o.infer)?;
    let written = super::report_files::write(&super::report_files::ReportInput {
        dir: &report_dir,
        model: &new_model,
        labels: &labels_name,
        labels_sha256: &labels_sha,
        parent_created_at: &parent_created_at,
        items: &items
            .iter()
            .map(|i| (&i.row, i.class, i.split, i.features.sha256.as_str()))
            .collect::<Vec<_>>(),
        plan: &plan,
        stats,
        cache_uri: &cache.uri(),
        hyper: &o.hyper,
        trained: &trained,
        eval: &eval,
        eval_tta: &eval_tta,
        calibration: &reliability,
        refer_band: refer_band.as_ref(),
        levels: &by_level,
        ood_distances: fitted_ood
            .as_ref()
            .map(|(model, _)| {
                test.iter()
                    .map(|i| model.distance(&i.features.views[0]))
                    .collect()
            })
            .unwrap_or_default(),
        review: val
            .iter()
            .zip(&reviewed.images)
            .map(|(i, v)| (&i.row, v))
            .collect(),
        validation: val
            .iter()
            .zip(&val_probabilities)
            .map(|(i, p)| (&i.row, i.class, p.as_slice()))
            .collect(),
        predictions: test
            .iter()
            .zip(&single)
            .zip(&tta)
            .map(|((i, p), q)| (&i.row, i.class, p.as_slice(), q.as_slice()))
            .collect(),
        decision: decision.as_ref(),
        gallery: o.gallery,
        seconds: [
            feature_seconds,
            train_seconds,
            started.elapsed().as_secs_f64(),
        ],
    })?;
    drop(new_model);
    if o.out.exists() {
        std::fs::remove_dir_all(&o.out).map_err(|source| TrainError::Io {
            path: o.out.display().to_string(),
            source,
        })?;
    }
    std::fs::rename(&staging, &o.out).map_err(|source| TrainError::Io {
        path: o.out.display().to_string(),
        source,
    })?;
    staged.0 = None;
    tracing::info!(
        report = %o.out.join("report").join(written.file_name().unwrap_or_default()).display(),
        "report written"
    );

    // Publish, then promote: an alias only ever points at a complete version.
    if let (Some(r), Some(d)) = (&registry, &decision) {
        r.publish(&o.out)?;
        r.record_decision(d)?;
        if d.promoted {
            let anchor = d.next_anchor.as_deref().unwrap_or(&version);
            r.set_alias_anchored(&o.alias, &version, &d.reason, anchor)?;
        }
        tracing::info!(
            version = %version,
            promoted = d.promoted,
            registry = %r.version_uri(&version),
            "{}",
            d.reason
        );
    }
    Ok(TrainOutcome {
        bundle: o.out.clone(),
        version,
        report_dir: o.out.join("report"),
        test: eval,
        test_tta: eval_tta,
        test_images,
        features_computed: stats.computed,
        features_cached: stats.cached,
        decision,
        refer_band,
        levels: by_level,
    })
}

/// Removes a half-written bundle folder when a run fails after starting it.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Equal-width confidence bins of the reported expected calibration error.
const RELIABILITY_BINS: usize = 10;

/// What the report shows about calibration.
pub(super) struct CalibrationReport {
    pub calibration: Calibration,
    /// The locked test split (identity view) at temperature 1 and at the fitted one.
    pub before: calibration::Reliability,
    pub after: calibration::Reliability,
}

/// The CIN2+ triage thresholds on the validation images' calibrated P(CIN2+)
/// (None for 2-class models, or a split without both kinds of image).
fn fit_refer_band(
    classes: &[String],
    probabilities: &[Vec<f64>],
    labels: &[usize],
    hyper: &super::HyperParams,
) -> Option<ReferBand> {
    let (scores, positive) = cin2_plus_scores(classes, probabilities, labels)?;
    let rows = cin2_plus_rows(classes);
    operating::fit_refer_band(
        &scores,
        &positive,
        rows.iter().map(|&i| classes[i].clone()).collect(),
        hyper.refer_sensitivity,
        hyper.refer_specificity,
    )
}

/// Probabilities of the test items at temperature `t`: the identity view, or
/// the mean over all views.
fn predict(head: &Head, task: Task, items: &[&Item], tta: bool, t: f64) -> Vec<Vec<f64>> {
    items
        .iter()
        .map(|i| {
            let views: &[Vec<f32>] = if tta {
                &i.features.views
            } else {
                &i.features.views[..1]
            };
            let mut mean = vec![0f64; head.rows.max(2)];
            for v in views {
                for (m, p) in
                    mean.iter_mut()
                        .zip(calibration::probabilities_at(task, &head.logits(v), t))
                {
                    *m += p / views.len() as f64;
                }
            }
            mean
        })
        .collect()
}

/// Macro AUC and CIN2+ sensitivity at `band`'s rule-out threshold of
/// calibrated `probabilities` against `truth`.
fn figures_of(
    classes: &[String],
    truth: &[usize],
    probabilities: &[Vec<f64>],
    band: Option<&ReferBand>,
) -> PromotionFigures {
    let cin2_sensitivity = band
        .zip(cin2_plus_scores(classes, probabilities, truth))
        .map(|(b, (scores, positive))| {
            operating::sensitivity_specificity(&scores, &positive, b.rule_out.threshold).0
        });
    PromotionFigures {
        macro_auc: report::evaluate(classes, truth, probabilities).macro_auc,
        cin2_sensitivity,
    }
}

/// A registry model's promotion figures on the validation items, with its
/// own temperature and refer band (features from the cache when it shares
/// the new model's backbone and preprocessing, else through its own backbone).
#[allow(clippy::too_many_arguments)]
fn validation_figures(
    bundle: &Bundle,
    dir: &Path,
    items: &[&Item],
    truth: &[usize],
    classes: &[String],
    new_model: &Model,
    cache: &FeatureCache,
    o: &TrainOptions,
    labels: &str,
) -> Result<PromotionFigures, TrainError> {
    let task = bundle.manifest.task;
    let probs = if bundle.backbone_sha256() == new_model.bundle.backbone_sha256()
        && bundle.manifest.input == new_model.manifest().input
        && bundle.manifest.preprocess == new_model.manifest().preprocess
    {
        predict(
            &bundle.head,
            task,
            items,
            false,
            bundle.manifest.temperature(),
        )
    } else {
        let other = Model::load(dir, &o.infer)?;
        let rows: Vec<LabelRow> = items.iter().map(|i| i.row.clone()).collect();
        let (feats, _) = extract(&other, &rows, labels, cache, None)?;
        feats
            .iter()
            .map(|f| {
                bundle
                    .manifest
                    .probabilities(&bundle.head.logits(&f.views[0]))
                    .into_iter()
                    .map(f64::from)
                    .collect()
            })
            .collect()
    };
    Ok(figures_of(
        classes,
        truth,
        &probs,
        bundle.manifest.refer_band.as_ref(),
    ))
}

/// Maps labels to class indices; names every unknown label and missing file by line.
fn check_rows(
    rows: &[LabelRow],
    labels: &str,
    scheme: ClassScheme,
    classes: &[String],
) -> Result<Vec<usize>, TrainError> {
    let mut problems = Vec::new();
    let mut class_of = Vec::with_capacity(rows.len());
    let mut seen = BTreeSet::new();
    for r in rows {
        match scheme.index_of_grade(&r.label) {
            Some(c) => class_of.push(c),
            None => {
                problems.push(format!(
                    "line {}: unknown label {:?} (expected CIN3, CIN2, CIN1, Non-neoplasm or one of {classes:?})",
                    r.line, r.label
                ));
                class_of.push(usize::MAX);
            }
        }
        if !r.path.is_file() {
            problems.push(format!(
                "line {}: image {} does not exist",
                r.line,
                r.path.display()
            ));
        }
        if !seen.insert(&r.path) {
            problems.push(format!(
                "line {}: image {} is listed twice",
                r.line,
                r.path.display()
            ));
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(10);
        let more = if n > 10 {
            format!("\n  ... and {} more", n - 10)
        } else {
            String::new()
        };
        return Err(TrainError::Data(format!(
            "{labels}: {n} problem(s):\n  {}{more}",
            problems.join("\n  ")
        )));
    }
    for (c, name) in classes.iter().enumerate() {
        if !class_of.contains(&c) {
            return Err(TrainError::Data(format!(
                "{labels}: class {name:?} has no labelled images; every class of the {}-class scheme needs examples",
                classes.len()
            )));
        }
    }
    Ok(class_of)
}

/// Images and patients per split and class.
fn split_summary(items: &[Item], classes: &[String]) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for s in Split::ALL {
        let these: Vec<&Item> = items.iter().filter(|i| i.split == s).collect();
        let patients: BTreeSet<&str> = these.iter().map(|i| i.row.patient_id.as_str()).collect();
        let per_class: BTreeMap<&str, usize> = classes
            .iter()
            .enumerate()
            .map(|(c, n)| (n.as_str(), these.iter().filter(|i| i.class == c).count()))
            .collect();
        out.insert(
            s.name().into(),
            serde_json::json!({"images": these.len(), "patients": patients.len(), "images_per_class": per_class}),
        );
    }
    out.into()
}

/// The backbone as a bundle folder: the given one, or a bundle made around a bare
/// ONNX file (kept alive by the returned temporary folder).
fn backbone_bundle(o: &TrainOptions) -> Result<(PathBuf, Option<tempfile::TempDir>), TrainError> {
    if o.backbone.is_dir() {
        return Ok((o.backbone.clone(), None));
    }
    let io = |source| TrainError::Io {
        path: o.backbone.display().to_string(),
        source,
    };
    if !o.backbone.is_file() {
        return Err(TrainError::Data(format!(
            "backbone {} is neither a bundle folder nor an ONNX file",
            o.backbone.display()
        )));
    }
    let tmp = tempfile::tempdir().map_err(io)?;
    let dir = tmp.path().join("backbone");
    std::fs::create_dir_all(&dir).map_err(io)?;
    std::fs::copy(&o.backbone, dir.join(BACKBONE_FILE)).map_err(io)?;
    let backbone =
        crate::infer::Backbone::load(&dir.join(BACKBONE_FILE), "image", "features", &o.infer)?;
    let (w, h) = (800u32, 600u32);
    let probe = backbone.features(vec![0f32; 3 * (w * h) as usize], 1, h, w)?;
    let channels = probe[0].channels;
    let n = o.classes.map(usize::from).unwrap_or(4);
    let scheme = ClassScheme::from_count(n)
        .ok_or_else(|| TrainError::Data(format!("no {n}-class scheme")))?;
    let task = if n == 2 {
        Task::Binary
    } else {
        Task::Multiclass
    };
    let rows = if n == 2 { 1 } else { n };
    let head = Head {
        rows,
        channels,
        weight: vec![0.0; rows * channels],
        bias: vec![0.0; rows],
    };
    let head_bytes = head.to_bytes();
    std::fs::write(dir.join(crate::model::HEAD_FILE), &head_bytes).map_err(io)?;
    let manifest = Manifest {
        schema: crate::model::BUNDLE_SCHEMA.into(),
        name: o
            .backbone
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("custom")
            .to_string(),
        version: "backbone".into(),
        architecture: "custom".into(),
        task,
        classes: scheme.classes().iter().map(|c| c.to_string()).collect(),
        input: crate::model::InputSpec {
            name: "image".into(),
            width: w,
            height: h,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        },
        features: crate::model::FeatureSpec {
            name: "features".into(),
            channels,
        },
        preprocess: crate::model::PreprocessSpec {
            version: crate::preprocess::PREPROCESS_VERSION.into(),
            clahe: Default::default(),
        },
        files: [
            (
                BACKBONE_FILE.to_string(),
                crate::hashing::sha256_file(&dir.join(BACKBONE_FILE)).map_err(io)?,
            ),
            (
                crate::model::HEAD_FILE.to_string(),
                crate::hashing::sha256_hex(&head_bytes),
            ),
        ]
        .into(),
        provenance: serde_json::json!({"backbone_file": o.backbone.display().to_string()}),
        metrics: serde_json::Value::Null,
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        parent_version: None,
        calibration: None,
        refer_band: None,
        quality: None,
        ood: None,
        cam_scale: None,
        quality_review: None,
    };
    std::fs::write(
        dir.join(crate::model::MANIFEST_FILE),
        serde_json::to_string_pretty(&manifest).expect("manifest serialises"),
    )
    .map_err(io)?;
    Ok((dir, Some(tmp)))
}
