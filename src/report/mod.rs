//! Evaluation reports a pathologist can look at: metrics on the locked test split
//! (`metrics`), PNG plots (`plots`), one HTML page that shows them (`html`) and
//! the model card (`card`).
//!
//! Nothing here needs libtorch: the types and plots are shared by `cinflow train`
//! and anything else that evaluates a bundle.

pub mod calibration;
pub mod card;
mod html;
pub mod levels;
pub mod metrics;
pub mod operating;
pub mod plots;

pub(crate) use html::esc as html_escape;
pub use html::write_html;
pub use metrics::{evaluate, wilson_interval, ClassMetrics, Evaluation, RocCurve};

use serde::{Deserialize, Serialize};

/// One epoch of head training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Learning rate used during this epoch.
    pub lr: f64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: f64,
    pub val_accuracy: f64,
}

/// The per-epoch curve of a training run and where it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingCurve {
    pub epochs: Vec<EpochRecord>,
    /// Epoch whose weights were kept (lowest validation loss).
    pub best_epoch: usize,
    /// Why training stopped (`early stopping ...` or `max epochs ...`).
    pub stopped: String,
}

/// One tile of the Grad-CAM gallery: a test image with its overlay.
#[derive(Debug, Clone)]
pub struct GalleryItem {
    /// The heatmap of the predicted class over the preprocessed image.
    pub overlay: image::RgbImage,
    /// Short name of the image (file name).
    pub name: String,
    pub truth: String,
    pub predicted: String,
    /// Probability of the predicted class.
    pub probability: f32,
}

impl GalleryItem {
    pub fn correct(&self) -> bool {
        self.truth == self.predicted
    }
}
