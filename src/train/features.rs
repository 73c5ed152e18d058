//! Pooled backbone features of every view of every labelled image, computed
//! through the serving path (the same preprocessing code and the same ONNX
//! backbone as the inference workers) and cached in an object store.
//!
//! Cache key: `features/<backbone sha256>/<preprocess key>/<image sha256>.safetensors`,
//! one object per image holding all 8 views (`views`, `[8, channels]` float32, row
//! `v` is view `v` of `views::VIEW_NAMES`). A changed image, backbone or
//! preprocessing therefore never reuses a stale entry.

use std::collections::BTreeMap;
use std::sync::Arc;

use rayon::prelude::*;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};

use super::labels::LabelRow;
use super::views::{self, VIEWS, VIEW_NAMES};
use crate::model::Manifest;
use crate::pipeline::{Model, Prepared};
use crate::storage::{join_key, ObjectStore};

/// Why features could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error("{labels} line {line}: cannot read image {path}: {detail}")]
    Read {
        labels: String,
        line: usize,
        path: String,
        detail: String,
    },
    #[error("{labels} line {line}: {path}: {detail}")]
    Image {
        labels: String,
        line: usize,
        path: String,
        detail: String,
    },
    #[error("backbone: {0}")]
    Backbone(#[from] crate::infer::InferError),
    #[error("feature cache: {0}")]
    Store(#[from] crate::storage::StoreError),
}

/// The pooled features of one image, one row per view.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageFeatures {
    pub sha256: String,
    pub views: Vec<Vec<f32>>,
}

/// How many images had to go through the backbone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExtractStats {
    pub computed: usize,
    pub cached: usize,
}

/// A feature cache in an object store.
#[derive(Debug, Clone)]
pub struct FeatureCache {
    store: Arc<dyn ObjectStore>,
    prefix: String,
}

impl FeatureCache {
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> FeatureCache {
        FeatureCache {
            store,
            prefix: prefix.trim_matches('/').to_string(),
        }
    }

    /// The object key of one image's features under one backbone and preprocessing.
    pub fn key(&self, manifest: &Manifest, backbone_sha256: &str, image_sha256: &str) -> String {
        join_key(&[
            &self.prefix,
            "features",
            backbone_sha256,
            &preprocess_key(manifest),
            &format!("{image_sha256}.safetensors"),
        ])
    }

    /// Where the cache lives, for logs and the report.
    pub fn uri(&self) -> String {
        self.store.uri(&join_key(&[&self.prefix, "features"]))
    }

    fn load(&self, key: &str, channels: usize) -> Option<Vec<Vec<f32>>> {
        let bytes = match self.store.get(key) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return None,
            Err(e) => {
                tracing::warn!(key, error = %e, "feature cache unreadable; recomputing");
                return None;
            }
        };
        let parsed = SafeTensors::deserialize(&bytes).ok().and_then(|st| {
            let t = st.tensor("views").ok()?;
            (t.dtype() == Dtype::F32 && t.shape() == [VIEWS, channels]).then(|| {
                t.data()
                    .chunks_exact(4 * channels)
                    .map(|row| {
                        row.chunks_exact(4)
                            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .collect()
                    })
                    .collect()
            })
        });
        if parsed.is_none() {
            tracing::warn!(
                key,
                "feature cache entry is not [8 x {channels}] float32; recomputing"
            );
        }
        parsed
    }

    fn save(&self, key: &str, views: &[Vec<f32>]) -> Result<(), FeatureError> {
        let channels = views[0].len();
        let data: Vec<u8> = views
            .iter()
            .flatten()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let t = TensorView::new(Dtype::F32, vec![VIEWS, channels], &data)
            .expect("buffer matches its shape");
        let meta: std::collections::HashMap<String, String> =
            [("views".to_string(), VIEW_NAMES.join(","))].into();
        let bytes =
            safetensors::serialize([("views", t)], Some(meta)).expect("one f32 tensor serialises");
        self.store.put(key, &bytes, "application/octet-stream")?;
        Ok(())
    }
}

/// The part of the cache key that names the preprocessing: its version and a
/// hash of every parameter that changes the backbone's input.
pub fn preprocess_key(m: &Manifest) -> String {
    let params = serde_json::json!({
        "preprocess": m.preprocess,
        "input": m.input,
    });
    let h = crate::hashing::sha256_hex(params.to_string().as_bytes());
    let version: String = m
        .preprocess
        .version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{version}-{}", &h[..12])
}

/// Pooled features of all 8 views of `rows`' images through `model`'s backbone,
/// from `cache` where present. `labels` names the labels file in errors.
pub fn extract(
    model: &Model,
    rows: &[LabelRow],
    labels: &str,
    cache: &FeatureCache,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<(Vec<ImageFeatures>, ExtractStats), FeatureError> {
    let m = model.manifest();
    let backbone_sha = model.bundle.backbone_sha256().to_string();
    let channels = m.features.channels;
    let mut out = Vec::with_capacity(rows.len());
    let mut stats = ExtractStats::default();
    // Decoding and CLAHE run in parallel per chunk; the backbone then takes each
    // image's 8 views as two batches of 4 (one per orientation).
    for chunk in rows.chunks(4) {
        let loaded: Vec<Loaded> = chunk
            .par_iter()
            .map(|row| {
                let bytes = read_image(row, labels)?;
                let sha = crate::hashing::sha256_hex(&bytes);
                let key = cache.key(m, &backbone_sha, &sha);
                if let Some(views) = cache.load(&key, channels) {
                    return Ok(Loaded::Cached(sha, views));
                }
                let prepared = prepare_image(model, row, labels, &bytes)?;
                Ok(Loaded::Fresh(sha, Box::new(prepared)))
            })
            .collect::<Result<_, FeatureError>>()?;
        for item in loaded {
            let (sha, views) = match item {
                Loaded::Cached(sha, v) => {
                    stats.cached += 1;
                    (sha, v)
                }
                Loaded::Fresh(sha, p) => {
                    let v = view_features(model, &p)?;
                    cache.save(&cache.key(m, &backbone_sha, &sha), &v)?;
                    stats.computed += 1;
                    (sha, v)
                }
            };
            out.push(ImageFeatures { sha256: sha, views });
        }
        if let Some(b) = bar {
            b.inc(chunk.len() as u64);
        }
    }
    Ok((out, stats))
}

/// A labelled image's bytes; an error names its line of `labels`.
pub(super) fn read_image(row: &LabelRow, labels: &str) -> Result<Vec<u8>, FeatureError> {
    std::fs::read(&row.path).map_err(|e| FeatureError::Read {
        labels: labels.to_string(),
        line: row.line,
        path: row.path.display().to_string(),
        detail: e.to_string(),
    })
}

/// A labelled image through `model`'s preprocessing (quality control
/// included); an error names its line of `labels`.
pub(super) fn prepare_image(
    model: &Model,
    row: &LabelRow,
    labels: &str,
    bytes: &[u8],
) -> Result<Prepared, FeatureError> {
    model.prepare(bytes).map_err(|e| FeatureError::Image {
        labels: labels.to_string(),
        line: row.line,
        path: row.path.display().to_string(),
        detail: e.to_string(),
    })
}

/// An image of a chunk: its sha256 and either its cached features or its
/// preprocessed pixels for the backbone.
enum Loaded {
    Cached(String, Vec<Vec<f32>>),
    Fresh(String, Box<Prepared>),
}

/// Pooled features of the 8 views of one prepared image.
pub fn view_features(model: &Model, p: &Prepared) -> Result<Vec<Vec<f32>>, FeatureError> {
    let m = model.manifest();
    let (h, w) = (m.input.height as usize, m.input.width as usize);
    let mut by_view: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
    for swapped in [false, true] {
        let vs: Vec<usize> = (0..VIEWS)
            .filter(|&v| views::swaps_axes(v) == swapped)
            .collect();
        let (bh, bw) = if swapped { (w, h) } else { (h, w) };
        let mut input = Vec::with_capacity(vs.len() * p.tensor.len());
        for &v in &vs {
            input.extend(views::apply(v, &p.tensor, 3, h, w));
        }
        let maps = model.backbone_features(input, vs.len(), bh as u32, bw as u32)?;
        for (v, f) in vs.into_iter().zip(maps) {
            by_view.insert(v, f.global_average_pool());
        }
    }
    Ok(by_view.into_values().collect())
}
