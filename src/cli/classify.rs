//! `cinflow classify`: local mode over the same pipeline the workers run.
//!
//! Three stages overlap through bounded channels: preparing batch n+1 (read,
//! decode, CLAHE, resize on the rayon pool) and writing batch n-1 (CAM overlays,
//! PNG encoding) run while the backbone works on batch n.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;

use anyhow::Context;
use rayon::prelude::*;

use super::inputs::{expand, file_uri, output_key};
use crate::infer::InferConfig;
use crate::pipeline::{render_artifacts, Graded, Model, Prepared};
use crate::result::{class_slug, HeatmapRef, ImageResult, ImageStatus, RawMapRef, ResultRecord};

#[derive(Debug, Clone, clap::Args)]
pub struct ClassifyArgs {
    /// Model bundle folder (manifest.json, backbone.onnx, head.safetensors).
    #[arg(long, env = "CINFLOW_MODEL")]
    pub model: PathBuf,
    /// Output folder for result JSONs, heatmaps and summary.csv.
    #[arg(long)]
    pub out: PathBuf,
    /// Images per inference batch.
    #[arg(long, env = "CINFLOW_BATCH_SIZE", default_value_t = 4)]
    pub batch_size: usize,
    #[command(flatten)]
    pub infer: InferConfig,
    /// Image files and/or folders (searched recursively for .jpg/.jpeg/.png/.tif/.tiff).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
}

/// What a classify run did.
#[derive(Debug, Clone)]
pub struct ClassifyReport {
    pub total: usize,
    pub graded: usize,
    pub failed: usize,
    /// Output key and result per input image, in input order.
    pub results: Vec<(String, ImageResult)>,
}

struct Item {
    key: String,
    path: PathBuf,
    prepared: Result<Prepared, String>,
}

/// Grades every input; per-image failures become error entries, not a crash.
pub fn classify(args: &ClassifyArgs) -> anyhow::Result<ClassifyReport> {
    let model = &Model::load(&args.model, &args.infer)?;
    let m = model.manifest();
    tracing::info!(model = %m.name, version = %m.version, provider = model.provider(), "model loaded");
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create output folder {}", args.out.display()))?;
    let paths = expand(&args.inputs);
    anyhow::ensure!(!paths.is_empty(), "no images found in {:?}", args.inputs);
    let mut used = HashSet::new();
    let keyed: Vec<(String, PathBuf)> = paths
        .into_iter()
        .map(|p| (output_key(&p, &mut used), p))
        .collect();
    let bar = super::progress_bar(keyed.len() as u64, "classify");
    let batch = args.batch_size.max(1);

    let results = std::thread::scope(|s| -> anyhow::Result<Vec<(String, ImageResult)>> {
        let (prep_tx, prep_rx) = sync_channel::<Vec<Item>>(1);
        let (out_tx, out_rx) = sync_channel::<Vec<(Item, Result<Graded, String>)>>(1);
        s.spawn(move || {
            for chunk in keyed.chunks(batch) {
                let items = chunk
                    .par_iter()
                    .map(|(key, path)| Item {
                        key: key.clone(),
                        path: path.clone(),
                        prepared: std::fs::read(path)
                            .map_err(|e| format!("cannot read file: {e}"))
                            .and_then(|b| model.prepare(&b).map_err(|e| e.to_string())),
                    })
                    .collect();
                if prep_tx.send(items).is_err() {
                    break;
                }
            }
        });
        let bar = &bar;
        let writer = s.spawn(move || -> anyhow::Result<Vec<(String, ImageResult)>> {
            let mut all = Vec::new();
            for graded in out_rx {
                let written: Vec<_> = graded
                    .into_par_iter()
                    .map(|(item, g)| write_outputs(&args.out, model, item, g))
                    .collect::<anyhow::Result<_>>()?;
                bar.inc(written.len() as u64);
                all.extend(written);
            }
            Ok(all)
        });
        for items in prep_rx {
            let ok: Vec<&Prepared> = items
                .iter()
                .filter_map(|i| i.prepared.as_ref().ok())
                .collect();
            let mut graded = match model.grade(&ok) {
                Ok(g) => g.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(e) => vec![Err(e.to_string()); ok.len()],
            }
            .into_iter();
            let paired = items
                .into_iter()
                .map(|item| {
                    let g = match &item.prepared {
                        Ok(_) => graded.next().expect("one grade per prepared image"),
                        Err(e) => Err(e.clone()),
                    };
                    (item, g)
                })
                .collect();
            if out_tx.send(paired).is_err() {
                break;
            }
        }
        drop(out_tx);
        writer.join().expect("writer thread panicked")
    })?;
    bar.finish_and_clear();
    write_summary(&args.out.join("summary.csv"), &m.classes, &results)?;
    let failed = results
        .iter()
        .filter(|(_, r)| r.status == ImageStatus::Error)
        .count();
    Ok(ClassifyReport {
        total: results.len(),
        graded: results.len() - failed,
        failed,
        results,
    })
}

/// Writes `<key>.json`, `<key>.heatmap.<class>.png` per class and `<key>.cam.npy`.
fn write_outputs(
    out: &Path,
    model: &Model,
    item: Item,
    graded: Result<Graded, String>,
) -> anyhow::Result<(String, ImageResult)> {
    let m = model.manifest();
    let uri = file_uri(&item.path);
    let result = match (&item.prepared, graded) {
        (Ok(prepared), Ok(g)) => {
            let art = render_artifacts(prepared, &g, m);
            let mut heatmaps = Vec::new();
            for h in &art.heatmaps {
                let name = format!("{}.heatmap.{}.png", item.key, class_slug(&h.class));
                write(out, &name, &h.png)?;
                heatmaps.push(HeatmapRef {
                    class: h.class.clone(),
                    overlay: name,
                    scale: h.scale,
                });
            }
            let raw = format!("{}.cam.npy", item.key);
            write(out, &raw, &art.raw_npy)?;
            ImageResult::graded(
                uri,
                prepared,
                &g,
                m,
                heatmaps,
                RawMapRef {
                    uri: raw,
                    shape: art.raw_shape,
                    units: "logit".into(),
                },
            )
        }
        (Ok(prepared), Err(e)) => ImageResult::failed(uri, Some(prepared.sha256.clone()), e),
        (Err(e), _) => {
            tracing::warn!(image = %item.path.display(), error = %e, "image not graded");
            ImageResult::failed(uri, None, e.clone())
        }
    };
    let record = ResultRecord::new(None, None, m, model.provider(), vec![result.clone()]);
    let json = serde_json::to_vec_pretty(&record).expect("result serialises");
    write(out, &format!("{}.json", item.key), &json)?;
    Ok((item.key, result))
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

fn write_summary(
    path: &Path,
    classes: &[String],
    results: &[(String, ImageResult)],
) -> anyhow::Result<()> {
    let mut w =
        csv::Writer::from_path(path).with_context(|| format!("cannot write {}", path.display()))?;
    let mut header = vec![
        "key".to_string(),
        "image".into(),
        "status".into(),
        "predicted_class".into(),
    ];
    header.extend(classes.iter().map(|c| format!("p_{c}")));
    header.push("error".into());
    w.write_record(&header)?;
    for (key, r) in results {
        let mut row = vec![
            key.clone(),
            r.uri.clone(),
            format!("{:?}", r.status).to_lowercase(),
            r.predicted_class.clone().unwrap_or_default(),
        ];
        row.extend(classes.iter().map(|c| {
            r.probabilities
                .as_ref()
                .and_then(|p| p.get(c))
                .map(|p| format!("{p:.6}"))
                .unwrap_or_default()
        }));
        row.push(r.error.clone().unwrap_or_default());
        w.write_record(&row)?;
    }
    w.flush()?;
    Ok(())
}
