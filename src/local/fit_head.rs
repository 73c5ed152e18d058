//! `cinflow fit-head`: the simplest honest head until tch training lands — a
//! diagonal linear discriminant on the backbone's pooled features.

use std::path::PathBuf;

use anyhow::Context;
use rayon::prelude::*;

use crate::infer::InferConfig;
use crate::model::{fit_diagonal_lda, ClassScheme, Head};
use crate::pipeline::Model;
use crate::train::read_labels;

#[derive(Debug, Clone, clap::Args)]
pub struct FitHeadArgs {
    /// Bundle whose backbone (and class scheme) to use.
    #[arg(long, env = "CINFLOW_MODEL", value_name = "BUNDLE_DIR")]
    pub model: PathBuf,
    /// Labels CSV with columns path,label,patient_id (paths relative to the CSV).
    #[arg(long)]
    pub labels: PathBuf,
    /// Folder for the new bundle version.
    #[arg(long)]
    pub out: PathBuf,
    /// Version string of the new bundle (default: fit-<UTC timestamp>).
    #[arg(long)]
    pub version: Option<String>,
    /// Images per inference batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[command(flatten)]
    pub infer: InferConfig,
}

/// What `fit_head` produced.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "train", allow(dead_code))]
pub struct FitSummary {
    pub images: usize,
    pub train_accuracy: f64,
}

/// Computes pooled features for every labelled image, fits the head and writes a
/// new bundle version next to the old one's backbone.
pub fn fit_head(args: &FitHeadArgs) -> anyhow::Result<FitSummary> {
    let model = Model::load(&args.model, &args.infer)?;
    let m = model.manifest().clone();
    let scheme = ClassScheme::from_count(m.classes.len())
        .with_context(|| format!("unsupported class count {}", m.classes.len()))?;
    let rows = read_labels(&args.labels)?;
    let mut labels = Vec::with_capacity(rows.len());
    for row in &rows {
        let idx = scheme.index_of_grade(&row.label).with_context(|| {
            format!(
                "{} line {}: unknown label {:?} (expected one of CIN3, CIN2, CIN1, Non-neoplasm or {:?})",
                args.labels.display(),
                row.line,
                row.label,
                m.classes
            )
        })?;
        labels.push(idx);
    }
    let bar = crate::progress::progress_bar(rows.len() as u64, "features");
    let mut pooled = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(args.batch_size.max(1)) {
        let prepared = chunk
            .par_iter()
            .map(|row| {
                let bytes = std::fs::read(&row.path).with_context(|| {
                    format!(
                        "{} line {}: cannot read {}",
                        args.labels.display(),
                        row.line,
                        row.path.display()
                    )
                })?;
                model.prepare(&bytes).with_context(|| {
                    format!(
                        "{} line {}: {}",
                        args.labels.display(),
                        row.line,
                        row.path.display()
                    )
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let refs: Vec<_> = prepared.iter().collect();
        pooled.extend(
            model
                .features(&refs)?
                .iter()
                .map(|f| f.global_average_pool()),
        );
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let head: Head = fit_diagonal_lda(m.task, m.classes.len(), &pooled, &labels)?;
    let correct = pooled
        .iter()
        .zip(&labels)
        .filter(|(x, y)| {
            let p = crate::model::probabilities(m.task, &head.logits(x));
            crate::pipeline::argmax(&p) == **y
        })
        .count();
    let train_accuracy = correct as f64 / rows.len() as f64;
    let mut counts = std::collections::BTreeMap::new();
    for y in &labels {
        *counts.entry(m.classes[*y].clone()).or_insert(0usize) += 1;
    }
    let now = chrono::Utc::now();
    let mut manifest = m.clone();
    manifest.version = args
        .version
        .clone()
        .unwrap_or_else(|| format!("fit-{}", now.format("%Y%m%dT%H%M%SZ")));
    manifest.parent_version = Some(m.version.clone());
    manifest.created_at = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    manifest.provenance = serde_json::json!({
        "tool": "cinflow fit-head",
        "head": "diagonal linear discriminant (shared diagonal covariance, class priors) on global-average-pooled backbone features",
        "labels": args.labels.display().to_string(),
        "labels_sha256": crate::hashing::sha256_file(&args.labels)?,
        "images_per_class": counts,
        "backbone_from": m.provenance,
    });
    manifest.metrics =
        serde_json::json!({ "train_accuracy": train_accuracy, "train_images": rows.len() });
    model
        .bundle
        .write_version(&args.out, manifest, &head, None)?;
    tracing::info!(out = %args.out.display(), images = rows.len(), train_accuracy, "head fitted");
    Ok(FitSummary {
        images: rows.len(),
        train_accuracy,
    })
}
