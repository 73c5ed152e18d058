//! `cinflow fit-head`: the simplest honest head until tch training lands — a
//! diagonal linear discriminant on the backbone's pooled features.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rayon::prelude::*;

use crate::infer::InferConfig;
use crate::model::{fit_diagonal_lda, ClassScheme, Head};
use crate::pipeline::Model;

#[derive(Debug, Clone, clap::Args)]
pub struct FitHeadArgs {
    /// Bundle whose backbone (and class scheme) to use.
    #[arg(long)]
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

/// One row of a labels CSV.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelRow {
    pub line: usize,
    pub path: PathBuf,
    pub label: String,
    pub patient_id: String,
}

/// Reads `path,label,patient_id` (extra columns ignored); relative paths resolve
/// against the CSV's folder. Problems are reported with their line numbers.
pub fn read_labels(csv_path: &Path) -> anyhow::Result<Vec<LabelRow>> {
    let base = csv_path.parent().unwrap_or(Path::new("."));
    let mut r = csv::Reader::from_path(csv_path)
        .with_context(|| format!("cannot read labels file {}", csv_path.display()))?;
    let headers = r.headers()?.clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim() == name)
            .with_context(|| {
                format!(
                    "{}: header has no {name:?} column (found {:?})",
                    csv_path.display(),
                    headers
                )
            })
    };
    let (cp, cl, ci) = (col("path")?, col("label")?, col("patient_id")?);
    let mut rows = Vec::new();
    for (i, rec) in r.records().enumerate() {
        let line = i + 2;
        let rec =
            rec.with_context(|| format!("{} line {line}: malformed CSV", csv_path.display()))?;
        let get = |c: usize| rec.get(c).map(str::trim).unwrap_or("");
        if get(cp).is_empty() || get(cl).is_empty() || get(ci).is_empty() {
            bail!(
                "{} line {line}: path, label and patient_id must all be set",
                csv_path.display()
            );
        }
        rows.push(LabelRow {
            line,
            path: base.join(get(cp)),
            label: get(cl).to_string(),
            patient_id: get(ci).to_string(),
        });
    }
    anyhow::ensure!(
        !rows.is_empty(),
        "{}: no labelled images",
        csv_path.display()
    );
    Ok(rows)
}

/// What `fit_head` produced.
#[derive(Debug, Clone)]
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
    let bar = super::progress_bar(rows.len() as u64, "features");
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
    model.bundle.write_version(&args.out, manifest, &head)?;
    tracing::info!(out = %args.out.display(), images = rows.len(), train_accuracy, "head fitted");
    Ok(FitSummary {
        images: rows.len(),
        train_accuracy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_resolve_relative_paths_and_name_bad_lines() {
        let d = tempfile::tempdir().unwrap();
        let csv = d.path().join("labels.csv");
        std::fs::write(
            &csv,
            "path,label,patient_id,extra\na.jpg,CIN2,P1,x\n/abs/b.jpg,CIN3,P2,y\n",
        )
        .unwrap();
        let rows = read_labels(&csv).unwrap();
        assert_eq!(rows[0].path, d.path().join("a.jpg"));
        assert_eq!(rows[1].path, PathBuf::from("/abs/b.jpg"));
        assert_eq!((rows[1].line, rows[1].label.as_str()), (3, "CIN3"));

        std::fs::write(&csv, "path,label,patient_id\na.jpg,CIN2,P1\nb.jpg,,P2\n").unwrap();
        let e = read_labels(&csv).unwrap_err().to_string();
        assert!(e.contains("line 3"), "{e}");

        std::fs::write(&csv, "file,label\na.jpg,CIN2\n").unwrap();
        let e = read_labels(&csv).unwrap_err().to_string();
        assert!(e.contains("no \"path\" column"), "{e}");
    }
}
