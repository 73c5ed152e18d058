//! The per-image path shared by `cinflow classify` and the queue workers:
//! bytes -> decode -> CLAHE -> resize -> normalise -> backbone -> GAP + head ->
//! probabilities -> Grad-CAM maps -> the stored artifacts ([`artifacts`]).
//!
//! Everything here is synchronous and CPU/GPU heavy: async callers run it on
//! blocking threads.

pub mod artifacts;

pub use artifacts::{render, Artifact, Drawing, Overlays, Rendered};

use std::path::Path;
use std::time::Instant;

use image::RgbImage;

use crate::cam::{class_maps, ClassMaps};
use crate::infer::{Backbone, FeatureMap, InferConfig, InferError};
use crate::model::{Bundle, BundleError, Manifest, Triage};
use crate::preprocess::{self, PreprocessError};
use crate::quality::ImageQuality;

/// Why a model could not be made ready to serve.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Infer(#[from] InferError),
}

/// Milliseconds spent in each stage for one image.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageTimings {
    /// Download from the object store (workers only).
    #[serde(default)]
    pub fetch_ms: f64,
    pub decode_ms: f64,
    /// Input quality control, CLAHE, resize and normalisation.
    pub preprocess_ms: f64,
    /// Waiting for the backbone while another job's batch ran on it.
    #[serde(default)]
    pub infer_wait_ms: f64,
    /// Backbone time per image (the batch's run divided by its size).
    pub infer_ms: f64,
    pub cam_ms: f64,
    /// Encoding the preprocessed image, raw maps and overlays.
    #[serde(default)]
    pub render_ms: f64,
    /// Uploading (or writing) them.
    #[serde(default)]
    pub upload_ms: f64,
}

/// The backbone call that graded an image: images of how many jobs shared it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BatchInfo {
    /// Images in the call.
    pub images: usize,
    /// Distinct jobs (or runs) those images came from.
    pub jobs: usize,
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// A decoded and preprocessed image, ready for the backbone.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// sha256 of the original bytes.
    pub sha256: String,
    /// Width x height of the decoded original.
    pub original_size: (u32, u32),
    /// The CLAHE'd, resized 8-bit image (what the heatmaps are drawn over).
    pub image: RgbImage,
    /// Normalised CHW float32 input.
    pub tensor: Vec<f32>,
    /// Input quality measured on the original (before CLAHE) and the checks it failed.
    pub quality: ImageQuality,
    pub timings: StageTimings,
}

/// One graded image.
#[derive(Debug, Clone)]
pub struct Graded {
    pub logits: Vec<f32>,
    /// One probability per class of the manifest, summing to 1.
    pub probabilities: Vec<f32>,
    /// Index of the most probable class.
    pub predicted: usize,
    /// P(CIN2+) (4- and 3-class models) and its triage (bundles with a refer band).
    pub p_cin2_plus: Option<f32>,
    pub triage: Option<Triage>,
    /// The prepared image's quality with the out-of-distribution score added.
    pub quality: ImageQuality,
    /// Un-clipped Grad-CAM maps in logit units at feature resolution.
    pub maps: ClassMaps,
    pub timings: StageTimings,
    pub batch: BatchInfo,
}

/// A verified bundle with its backbone loaded: what a worker serves.
#[derive(Debug)]
pub struct Model {
    pub bundle: Bundle,
    backbone: Backbone,
}

impl Model {
    /// Loads and verifies the bundle at `dir` and starts an inference session.
    pub fn load(dir: &Path, cfg: &InferConfig) -> Result<Model, ModelError> {
        let bundle = Bundle::load(dir)?;
        let m = &bundle.manifest;
        let backbone = Backbone::load(
            &bundle.backbone_path(),
            &m.input.name,
            &m.features.name,
            cfg,
        )?;
        Ok(Model { bundle, backbone })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.bundle.manifest
    }

    /// The ONNX Runtime execution provider in use.
    pub fn provider(&self) -> &'static str {
        self.backbone.provider()
    }

    /// Runs one inference on blank images per batch size served, so that the
    /// first real job does not pay for ONNX Runtime's lazy initialisation
    /// (memory arenas, kernels; on CUDA the convolution algorithm search, which
    /// is per input shape).
    pub fn warm_up(&self, batch_sizes: &[usize]) -> Result<(), InferError> {
        let m = self.manifest();
        self.backbone
            .warm_up(m.input.height, m.input.width, batch_sizes)
    }

    /// Decodes and preprocesses one image's bytes as this model expects.
    pub fn prepare(&self, bytes: &[u8]) -> Result<Prepared, PreprocessError> {
        prepare(bytes, self.manifest())
    }

    /// Backbone feature maps for a batch of prepared images.
    pub fn features(&self, batch: &[&Prepared]) -> Result<Vec<FeatureMap>, InferError> {
        self.features_timed(batch).map(|(f, _)| f)
    }

    /// [`Model::features`] and how long it waited for the session.
    fn features_timed(
        &self,
        batch: &[&Prepared],
    ) -> Result<(Vec<FeatureMap>, std::time::Duration), InferError> {
        let m = self.manifest();
        let mut input = Vec::with_capacity(batch.iter().map(|p| p.tensor.len()).sum());
        for p in batch {
            input.extend_from_slice(&p.tensor);
        }
        let (maps, waited) =
            self.backbone
                .features_timed(input, batch.len(), m.input.height, m.input.width)?;
        self.check_channels(&maps)?;
        Ok((maps, waited))
    }

    fn check_channels(&self, maps: &[FeatureMap]) -> Result<(), InferError> {
        let m = self.manifest();
        if let Some(f) = maps.iter().find(|f| f.channels != m.features.channels) {
            return Err(InferError::Interface {
                path: self.bundle.backbone_path().display().to_string(),
                detail: format!(
                    "backbone gives {} feature channels, the manifest says {}",
                    f.channels, m.features.channels
                ),
            });
        }
        Ok(())
    }

    /// Backbone feature maps for `n` normalised CHW images of `height x width`
    /// (the training views include the rotated `width x height` orientation).
    pub fn backbone_features(
        &self,
        input: Vec<f32>,
        n: usize,
        height: u32,
        width: u32,
    ) -> Result<Vec<FeatureMap>, InferError> {
        let maps = self.backbone.features(input, n, height, width)?;
        self.check_channels(&maps)?;
        Ok(maps)
    }

    /// Grades a batch: backbone, pooling, head, probabilities and Grad-CAM maps.
    pub fn grade(&self, batch: &[&Prepared]) -> Result<Vec<Graded>, InferError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let t = Instant::now();
        let (features, waited) = self.features_timed(batch)?;
        let wait_ms = waited.as_secs_f64() * 1e3;
        let infer_ms = (ms(t) - wait_ms) / batch.len() as f64;
        let m = self.manifest();
        let head = &self.bundle.head;
        Ok(features
            .iter()
            .zip(batch)
            .map(|(f, p)| {
                let t = Instant::now();
                let pooled = f.global_average_pool();
                let logits = head.logits(&pooled);
                let quality = match (&self.bundle.ood, &m.ood) {
                    (Some(model), Some(spec)) => {
                        p.quality.clone().with_ood(model.distance(&pooled), spec)
                    }
                    _ => p.quality.clone(),
                };
                let probabilities = m.probabilities(&logits);
                let predicted = argmax(&probabilities);
                let p_cin2_plus = m.p_cin2_plus(&probabilities);
                // An image that failed quality control is referred whatever its P(CIN2+).
                let triage = p_cin2_plus.and_then(|q| m.triage(q)).map(|t| {
                    if quality.passed() {
                        t
                    } else {
                        Triage::Refer
                    }
                });
                let maps = class_maps(f, head, m.task);
                Graded {
                    logits,
                    probabilities,
                    predicted,
                    p_cin2_plus,
                    triage,
                    quality,
                    maps,
                    timings: StageTimings {
                        infer_wait_ms: wait_ms,
                        infer_ms,
                        cam_ms: ms(t),
                        ..p.timings
                    },
                    batch: BatchInfo {
                        images: batch.len(),
                        jobs: 1,
                    },
                }
            })
            .collect())
    }
}

/// Decode -> CLAHE -> resize -> normalise, with the manifest's parameters.
pub fn prepare(bytes: &[u8], manifest: &Manifest) -> Result<Prepared, PreprocessError> {
    let t = Instant::now();
    let sha256 = crate::hashing::sha256_hex(bytes);
    let decoded = preprocess::decode(bytes)?;
    let decode_ms = ms(t);
    let t = Instant::now();
    let quality = crate::quality::check(
        &decoded,
        (manifest.input.width, manifest.input.height),
        &manifest.quality_thresholds(),
    );
    let image = preprocess::preprocess_image(&decoded, &manifest.preprocess_config());
    let mut tensor = vec![0f32; 3 * (image.width() * image.height()) as usize];
    preprocess::normalise_into(&image, manifest.input.mean, manifest.input.std, &mut tensor);
    Ok(Prepared {
        sha256,
        original_size: decoded.dimensions(),
        image,
        tensor,
        quality,
        timings: StageTimings {
            decode_ms,
            preprocess_ms: ms(t),
            ..Default::default()
        },
    })
}

/// Index of the largest value (the first one on ties).
pub fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, v)| {
            if *v > best.1 {
                (i, *v)
            } else {
                best
            }
        })
        .0
}

#[cfg(test)]
mod tests {
    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(super::argmax(&[0.1, 0.5, 0.5, 0.2]), 1);
    }
}
