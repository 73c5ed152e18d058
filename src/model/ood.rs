//! Out-of-distribution score: how unlike the training images an image's
//! pooled backbone features are.
//!
//! `cinflow train` fits the mean and a Ledoit-Wolf shrunk covariance of the
//! training images' pooled features (identity view) and stores the mean and
//! the covariance's inverse in `ood.safetensors`; the score is the Mahalanobis
//! distance `sqrt((x - mean)ᵀ P (x - mean))`. The threshold is a high
//! percentile of the validation images' distances (99th by default), so about
//! one in-distribution image in a hundred is flagged; an image of something
//! else (a natural photo, another stain, a blank slide) lies far beyond it.

use std::path::Path;

use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use super::HeadError;

/// The file in a bundle that holds the mean and precision matrix.
pub const OOD_FILE: &str = "ood.safetensors";

/// What the manifest says about the score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OodSpec {
    /// Mahalanobis distance above which an image is flagged.
    pub threshold: f64,
    /// The percentile of the validation images' distances it is.
    pub percentile: f64,
    /// Where the mean and covariance come from (`train`) and how many images.
    pub fitted_on: String,
    pub images: usize,
    /// Where the threshold was chosen (`validation`).
    pub threshold_from: String,
    /// Ledoit-Wolf shrinkage of the covariance towards a scaled identity.
    pub shrinkage: f64,
}

/// The mean and precision matrix of the training features.
#[derive(Debug, Clone, PartialEq)]
pub struct OodModel {
    pub channels: usize,
    pub mean: Vec<f32>,
    /// `[channels x channels]`, row-major.
    pub precision: Vec<f32>,
}

impl OodModel {
    /// Mahalanobis distance of pooled features (accumulated in f64).
    pub fn distance(&self, pooled: &[f32]) -> f64 {
        assert_eq!(pooled.len(), self.channels, "pooled features vs OOD model");
        let d: Vec<f64> = pooled
            .iter()
            .zip(&self.mean)
            .map(|(x, m)| f64::from(*x) - f64::from(*m))
            .collect();
        let mut q = 0f64;
        for (i, di) in d.iter().enumerate() {
            let row = &self.precision[i * self.channels..(i + 1) * self.channels];
            let dot: f64 = row.iter().zip(&d).map(|(p, dj)| f64::from(*p) * dj).sum();
            q += di * dot;
        }
        q.max(0.0).sqrt()
    }

    /// Serialises to safetensors (`mean` [C], `precision` [C, C], float32).
    pub fn to_bytes(&self) -> Vec<u8> {
        let m: Vec<u8> = self.mean.iter().flat_map(|v| v.to_le_bytes()).collect();
        let p: Vec<u8> = self
            .precision
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let c = self.channels;
        let tensors = [
            (
                "mean",
                TensorView::new(Dtype::F32, vec![c], &m).expect("mean buffer matches"),
            ),
            (
                "precision",
                TensorView::new(Dtype::F32, vec![c, c], &p).expect("precision buffer matches"),
            ),
        ];
        safetensors::serialize(tensors, None).expect("two f32 tensors serialise")
    }

    /// Reads `ood.safetensors` and checks it fits `channels` features.
    pub fn load(path: &Path, channels: usize) -> Result<OodModel, HeadError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| HeadError::Io {
            path: name.clone(),
            source,
        })?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| HeadError::Format {
            path: name.clone(),
            detail: e.to_string(),
        })?;
        let get = |t: &str, shape: Vec<usize>| -> Result<Vec<f32>, HeadError> {
            let shape_err = |detail: String| HeadError::Shape {
                path: name.clone(),
                detail,
            };
            let view = st
                .tensor(t)
                .map_err(|_| shape_err(format!("missing tensor {t:?}")))?;
            if view.dtype() != Dtype::F32 || view.shape() != shape.as_slice() {
                return Err(shape_err(format!(
                    "tensor {t:?} is {:?} {:?}, expected F32 {shape:?}",
                    view.dtype(),
                    view.shape()
                )));
            }
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if let Some(bad) = data.iter().find(|v| !v.is_finite()) {
                return Err(shape_err(format!(
                    "{t:?} contains a non-finite value ({bad})"
                )));
            }
            Ok(data)
        };
        Ok(OodModel {
            channels,
            mean: get("mean", vec![channels])?,
            precision: get("precision", vec![channels, channels])?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_is_mahalanobis_and_the_file_round_trips() {
        // Precision diag(1, 4): a step of 1 along the second channel is as far
        // as a step of 2 along the first.
        let m = OodModel {
            channels: 2,
            mean: vec![1.0, -1.0],
            precision: vec![1.0, 0.0, 0.0, 4.0],
        };
        assert_eq!(m.distance(&[1.0, -1.0]), 0.0);
        assert!((m.distance(&[3.0, -1.0]) - 2.0).abs() < 1e-12);
        assert!((m.distance(&[1.0, 0.0]) - 2.0).abs() < 1e-12);
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join(OOD_FILE);
        std::fs::write(&p, m.to_bytes()).unwrap();
        assert_eq!(OodModel::load(&p, 2).unwrap(), m);
        let e = OodModel::load(&p, 3).unwrap_err().to_string();
        assert!(e.contains("expected F32 [3]"), "{e}");
    }
}
