//! `manifest.json`: everything needed to reproduce one model version's outputs.

use serde::{Deserialize, Serialize};

use super::ood::{OodSpec, OOD_FILE};
use super::triage::{cin2_plus_rows, ReferBand, Triage};
use crate::preprocess::{ClaheParams, PreprocessConfig};
use crate::quality::QualityThresholds;

/// Schema tag of the manifest this code reads and writes.
pub const BUNDLE_SCHEMA: &str = "cinflow.bundle/v1";

/// How logits become probabilities, and which loss trains the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Softmax over C logits, categorical cross-entropy.
    Multiclass,
    /// One sigmoid logit for the first class, binary cross-entropy.
    Binary,
}

/// The class schemes of the product: 4-class (CIN3, CIN2, CIN1, Non-neoplasm),
/// the published study's 3-class (CIN2-3, CIN1, Non-neoplasm) and 2-class (CIN,
/// Non-neoplasm); classes are ordered most severe first (README.md, opening).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassScheme {
    /// CIN3, CIN2, CIN1, Non-neoplasm.
    Four,
    /// CIN2-3, CIN1, Non-neoplasm (the published study's merge).
    Three,
    /// CIN, Non-neoplasm.
    Two,
}

impl ClassScheme {
    /// Class names in the order of the head's rows (most severe first).
    pub fn classes(self) -> &'static [&'static str] {
        match self {
            ClassScheme::Four => &["CIN3", "CIN2", "CIN1", "Non-neoplasm"],
            ClassScheme::Three => &["CIN2-3", "CIN1", "Non-neoplasm"],
            ClassScheme::Two => &["CIN", "Non-neoplasm"],
        }
    }

    /// The scheme whose class count is `n`.
    pub fn from_count(n: usize) -> Option<Self> {
        match n {
            4 => Some(ClassScheme::Four),
            3 => Some(ClassScheme::Three),
            2 => Some(ClassScheme::Two),
            _ => None,
        }
    }

    /// Maps a 4-grade label ("CIN3", "CIN2", "CIN1", "Non-neoplasm") onto this scheme's class index.
    pub fn index_of_grade(self, grade: &str) -> Option<usize> {
        let g = match grade {
            "CIN3" => 0,
            "CIN2" => 1,
            "CIN1" => 2,
            "Non-neoplasm" => 3,
            _ => return self.classes().iter().position(|c| *c == grade),
        };
        Some(match self {
            ClassScheme::Four => g,
            ClassScheme::Three => [0, 0, 1, 2][g],
            ClassScheme::Two => [0, 0, 0, 1][g],
        })
    }
}

/// Network input: size and normalisation (applied to pixel / 255).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// The backbone output that the head pools.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureSpec {
    pub name: String,
    pub channels: usize,
}

/// Preprocessing that must run before the backbone, versioned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessSpec {
    pub version: String,
    pub clahe: ClaheParams,
}

/// `manifest.json` of a model bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: String,
    pub name: String,
    pub version: String,
    pub architecture: String,
    pub task: Task,
    pub classes: Vec<String>,
    pub input: InputSpec,
    pub features: FeatureSpec,
    pub preprocess: PreprocessSpec,
    /// sha256 (hex) of every other file of the bundle, by file name.
    pub files: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub provenance: serde_json::Value,
    #[serde(default)]
    pub metrics: serde_json::Value,
    pub created_at: String,
    #[serde(default)]
    pub parent_version: Option<String>,
    /// Temperature scaling of the head's logits, fitted on the validation
    /// split after the head was trained (absent: probabilities as the head
    /// gives them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
    /// The CIN2+ triage thresholds, chosen on the validation split (absent:
    /// 2-class models, and bundles made before training chose them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refer_band: Option<ReferBand>,
    /// Input quality limits for this model's images (absent: the defaults of
    /// [`QualityThresholds`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<QualityThresholds>,
    /// The out-of-distribution score's threshold; the mean and precision
    /// matrix are in `ood.safetensors` (absent: no score).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ood: Option<OodSpec>,
    /// The overlay scale of this version, fitted on the validation split
    /// (absent: each overlay on its own map's maximum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cam_scale: Option<crate::cam::CamScale>,
    /// Input quality measured on the validation split when this version was
    /// trained: what the quality limits flag among images like its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality_review: Option<crate::quality::QualityReview>,
}

/// How served probabilities are calibrated: `softmax(logits / temperature)`
/// (the sigmoid for a binary head). The logits, and so the predicted class and
/// the Grad-CAM maps, are the head's own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// `temperature` (the only method so far).
    pub method: String,
    pub temperature: f64,
    /// The split it was fitted on (`validation`) and how many images.
    pub fitted_on: String,
    pub images: usize,
    /// Mean negative log-likelihood of those images before and after.
    pub nll_before: f64,
    pub nll_after: f64,
}

impl Manifest {
    /// Number of head rows: one per class, or a single logit for a binary task.
    pub fn head_rows(&self) -> usize {
        match self.task {
            Task::Multiclass => self.classes.len(),
            Task::Binary => 1,
        }
    }

    /// The preprocessing configuration this model was trained with.
    pub fn preprocess_config(&self) -> PreprocessConfig {
        PreprocessConfig {
            width: self.input.width,
            height: self.input.height,
            clahe: self.preprocess.clahe,
        }
    }

    /// The temperature served probabilities are computed at (1: uncalibrated).
    pub fn temperature(&self) -> f64 {
        self.calibration.as_ref().map_or(1.0, |c| c.temperature)
    }

    /// Served probabilities of one image's logits, calibrated when the bundle
    /// says so.
    pub fn probabilities(&self, logits: &[f32]) -> Vec<f32> {
        crate::report::calibration::probabilities_at(self.task, logits, self.temperature())
            .into_iter()
            .map(|p| p as f32)
            .collect()
    }

    /// P(CIN2+) of one image's served probabilities: the sum over the CIN2+
    /// classes (None for 2-class models).
    pub fn p_cin2_plus(&self, probabilities: &[f32]) -> Option<f32> {
        let rows = cin2_plus_rows(&self.classes);
        (!rows.is_empty()).then(|| rows.iter().map(|&i| probabilities[i]).sum::<f32>().min(1.0))
    }

    /// The input quality limits images are checked against.
    pub fn quality_thresholds(&self) -> QualityThresholds {
        self.quality.unwrap_or_default()
    }

    /// How an image with P(CIN2+) `p` is triaged (None without a refer band).
    pub fn triage(&self, p: f32) -> Option<Triage> {
        self.refer_band.as_ref().map(|b| b.triage(f64::from(p)))
    }

    /// Consistency checks that need no files: returns every problem found.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(band) = &self.refer_band {
            p.extend(band.problems(&self.classes));
        }
        if let Some(q) = &self.quality {
            p.extend(q.problems());
        }
        if let Some(o) = &self.ood {
            let valid = o.threshold.is_finite()
                && o.threshold > 0.0
                && o.percentile > 0.0
                && o.percentile <= 100.0;
            if !valid {
                p.push(format!(
                    "ood threshold {} (percentile {}) must be positive, the percentile in (0, 100]",
                    o.threshold, o.percentile
                ));
            }
            if !self.files.contains_key(OOD_FILE) {
                p.push(format!(
                    "\"ood\" is set but \"files\" has no sha256 for {OOD_FILE}"
                ));
            }
        }
        if let Some(c) = &self.calibration {
            if c.method != "temperature" || !(c.temperature.is_finite() && c.temperature > 0.0) {
                p.push(format!(
                    "calibration {:?} with temperature {} is not a positive temperature",
                    c.method, c.temperature
                ));
            }
        }
        if self.schema != BUNDLE_SCHEMA {
            p.push(format!(
                "schema is {:?}, expected {BUNDLE_SCHEMA:?}",
                self.schema
            ));
        }
        match (self.task, self.classes.len()) {
            (Task::Binary, 2) | (Task::Multiclass, 3) | (Task::Multiclass, 4) => {}
            (task, n) => p.push(format!(
                "task {task:?} with {n} classes; expected binary with 2 or multiclass with 3 or 4"
            )),
        }
        if self.input.width == 0 || self.input.height == 0 {
            p.push("input width and height must be positive".into());
        }
        if self.input.std.iter().any(|s| s.is_nan() || *s <= 0.0) {
            p.push(format!("input std {:?} must be positive", self.input.std));
        }
        if self.features.channels == 0 {
            p.push("features.channels must be positive".into());
        }
        let clahe = self.preprocess.clahe;
        if clahe.clip_limit.is_nan() || clahe.clip_limit <= 0.0 || clahe.tile_grid.contains(&0) {
            p.push(format!(
                "CLAHE parameters {clahe:?} invalid: clip limit and tile grid must be positive"
            ));
        }
        if self.preprocess.version != crate::preprocess::PREPROCESS_VERSION {
            p.push(format!(
                "preprocess version {:?} is not the one this build implements ({:?})",
                self.preprocess.version,
                crate::preprocess::PREPROCESS_VERSION
            ));
        }
        p
    }
}

#[cfg(test)]
impl Manifest {
    /// A minimal 4-class manifest for unit tests elsewhere in the crate.
    pub(crate) fn example() -> Manifest {
        serde_json::from_value(serde_json::json!({
            "schema": crate::model::BUNDLE_SCHEMA,
            "name": "t", "version": "1", "architecture": "tiny", "task": "multiclass",
            "classes": ["CIN3", "CIN2", "CIN1", "Non-neoplasm"],
            "input": {"name": "image", "width": 8, "height": 8, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
            "features": {"name": "features", "channels": 2},
            "preprocess": {"version": "x", "clahe": {"clip_limit": 2.0, "tile_grid": [8, 8]}},
            "files": {}, "created_at": "2026-01-01T00:00:00Z",
        }))
        .unwrap()
    }
}
