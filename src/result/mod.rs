//! The `cinflow.result/v1` record: what the LIS (or a person) reads for a job.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::Manifest;
use crate::pipeline::{BatchInfo, Graded, Prepared, StageTimings};
use crate::preprocess::ClaheParams;

pub mod fhir;

pub const RESULT_SCHEMA: &str = "cinflow.result/v1";

/// The rule that turns image grades into a slide grade.
pub const SLIDE_RULE: &str = "most-severe-image";

/// Which model produced a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    pub architecture: String,
    pub task: crate::model::Task,
    pub classes: Vec<String>,
    /// sha256 of every bundle file, by name.
    pub sha256: BTreeMap<String, String>,
}

impl ModelInfo {
    pub fn from_manifest(m: &Manifest) -> Self {
        ModelInfo {
            name: m.name.clone(),
            version: m.version.clone(),
            architecture: m.architecture.clone(),
            task: m.task,
            classes: m.classes.clone(),
            sha256: m.files.clone(),
        }
    }
}

/// Preprocessing as applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessInfo {
    pub version: String,
    pub clahe: ClaheParams,
    pub width: u32,
    pub height: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl PreprocessInfo {
    pub fn from_manifest(m: &Manifest) -> Self {
        PreprocessInfo {
            version: m.preprocess.version.clone(),
            clahe: m.preprocess.clahe,
            width: m.input.width,
            height: m.input.height,
            mean: m.input.mean,
            std: m.input.std,
        }
    }
}

/// A pre-drawn class overlay: where it is and what full red means. Overlays
/// of other classes are drawn from `preprocessed_image` and `raw_map`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeatmapRef {
    pub class: String,
    pub overlay: String,
    /// Map value (logit units) shown as full red in the overlay.
    pub scale: f32,
}

/// The raw Grad-CAM maps of an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawMapRef {
    pub uri: String,
    /// `[classes, h, w]`, float32 `.npy`.
    pub shape: [usize; 3],
    /// `logit`: sum_k W_ck A_k, whose mean plus the class bias is the class logit.
    pub units: String,
}

/// Outcome for one image: graded, or an error that names the problem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageResult {
    pub uri: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub status: ImageStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_size: Option<[u32; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probabilities: Option<BTreeMap<String, f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_class: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logits: Option<Vec<f32>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heatmaps: Vec<HeatmapRef>,
    /// The CLAHE'd, resized image the model saw (JPEG): what overlays are drawn on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocessed_image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_map: Option<RawMapRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<StageTimings>,
    /// The backbone call that graded the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchInfo>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageStatus {
    Ok,
    Error,
}

impl ImageResult {
    /// A graded image with its heatmaps and raw map.
    pub fn graded(
        uri: String,
        prepared: &Prepared,
        graded: &Graded,
        manifest: &Manifest,
        heatmaps: Vec<HeatmapRef>,
        raw_map: RawMapRef,
    ) -> Self {
        ImageResult {
            uri,
            sha256: Some(prepared.sha256.clone()),
            status: ImageStatus::Ok,
            error: None,
            original_size: Some([prepared.original_size.0, prepared.original_size.1]),
            probabilities: Some(
                manifest
                    .classes
                    .iter()
                    .cloned()
                    .zip(graded.probabilities.iter().copied())
                    .collect(),
            ),
            predicted_class: Some(manifest.classes[graded.predicted].clone()),
            logits: Some(graded.logits.clone()),
            heatmaps,
            preprocessed_image: None,
            raw_map: Some(raw_map),
            timings: Some(graded.timings),
            batch: Some(graded.batch),
        }
    }

    /// An image that could not be graded, with the reason.
    pub fn failed(uri: String, sha256: Option<String>, error: String) -> Self {
        ImageResult {
            uri,
            sha256,
            status: ImageStatus::Error,
            error: Some(error),
            original_size: None,
            probabilities: None,
            predicted_class: None,
            logits: None,
            heatmaps: Vec::new(),
            preprocessed_image: None,
            raw_map: None,
            timings: None,
            batch: None,
        }
    }
}

/// The slide-level grade: the most severe graded image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlideGrade {
    pub grade: String,
    pub rule: String,
    /// The image that determined the grade.
    pub image_uri: String,
}

/// Most severe predicted class over the graded images. Classes are ordered most
/// severe first in every scheme, so the smallest class index wins.
pub fn slide_grade(classes: &[String], images: &[ImageResult]) -> Option<SlideGrade> {
    images
        .iter()
        .filter_map(|r| {
            let c = r.predicted_class.as_ref()?;
            Some((classes.iter().position(|x| x == c)?, r))
        })
        .min_by_key(|(i, _)| *i)
        .map(|(i, r)| SlideGrade {
            grade: classes[i].clone(),
            rule: SLIDE_RULE.into(),
            image_uri: r.uri.clone(),
        })
}

/// Wall-clock milliseconds of a worker job's stages (all images together).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct JobTimings {
    /// From the publisher's AMQP timestamp to the worker receiving the job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_wait_ms: Option<f64>,
    /// Downloading, decoding and preprocessing every image (they overlap).
    pub fetch_prepare_ms: f64,
    /// Backbone, head and Grad-CAM of the whole batch.
    pub infer_ms: f64,
    /// Rendering and uploading heatmaps, raw maps and the result.
    pub upload_ms: f64,
    /// Receipt to result written.
    pub total_ms: f64,
}

/// Identifiers of the job, for the LIS.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobIds {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accession_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub specimen_id: Option<String>,
}

/// A `cinflow.result/v1` record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRecord {
    pub schema: String,
    #[serde(default)]
    pub job_id: Option<String>,
    #[serde(default)]
    pub slide_id: Option<String>,
    #[serde(default, flatten)]
    pub ids: JobIds,
    pub status: ImageStatus,
    /// Why the job failed (a bad message, or the images that could not be graded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where this record is stored (worker results).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_uri: Option<String>,
    /// The FHIR R4 DiagnosticReport written beside it (worker results).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir_report_uri: Option<String>,
    pub model: ModelInfo,
    pub preprocess: PreprocessInfo,
    pub execution_provider: String,
    pub images: Vec<ImageResult>,
    #[serde(default)]
    pub slide_grade: Option<SlideGrade>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<JobTimings>,
    /// Which delivery of the job produced this record (1 = the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    pub created_at: String,
}

impl ResultRecord {
    /// Assembles a record; the status is `error` if any image failed.
    pub fn new(
        job_id: Option<String>,
        slide_id: Option<String>,
        manifest: &Manifest,
        provider: &str,
        images: Vec<ImageResult>,
    ) -> Self {
        let failed: Vec<String> = images
            .iter()
            .filter(|i| i.status == ImageStatus::Error)
            .map(|i| format!("{}: {}", i.uri, i.error.as_deref().unwrap_or("error")))
            .collect();
        let (status, error) = if failed.is_empty() {
            (ImageStatus::Ok, None)
        } else {
            (
                ImageStatus::Error,
                Some(format!(
                    "{} of {} images not graded: {}",
                    failed.len(),
                    images.len(),
                    failed.join("; ")
                )),
            )
        };
        ResultRecord {
            schema: RESULT_SCHEMA.into(),
            job_id,
            slide_id,
            ids: JobIds::default(),
            status,
            error,
            result_uri: None,
            fhir_report_uri: None,
            model: ModelInfo::from_manifest(manifest),
            preprocess: PreprocessInfo::from_manifest(manifest),
            execution_provider: provider.into(),
            slide_grade: slide_grade(&manifest.classes, &images),
            images,
            timings: None,
            attempt: None,
            worker: None,
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }
    }

    /// An error record for a job that was refused as a whole (bad message, poison).
    pub fn rejected(
        job_id: String,
        manifest: &Manifest,
        provider: &str,
        images: Vec<String>,
        reason: &str,
    ) -> Self {
        let images = images
            .into_iter()
            .map(|uri| ImageResult::failed(uri, None, reason.to_string()))
            .collect();
        ResultRecord {
            status: ImageStatus::Error,
            error: Some(reason.to_string()),
            ..ResultRecord::new(Some(job_id), None, manifest, provider, images)
        }
    }
}

/// File-name form of a class name ("Non-neoplasm" stays, "CIN2-3" stays).
pub fn class_slug(class: &str) -> String {
    class
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graded(uri: &str, class: &str) -> ImageResult {
        ImageResult {
            predicted_class: Some(class.into()),
            status: ImageStatus::Ok,
            error: None,
            ..ImageResult::failed(uri.into(), None, String::new())
        }
    }

    #[test]
    fn slide_grade_is_the_most_severe_image() {
        let classes: Vec<String> = ["CIN3", "CIN2", "CIN1", "Non-neoplasm"]
            .map(String::from)
            .to_vec();
        let imgs = vec![
            graded("a", "CIN1"),
            graded("b", "CIN2"),
            ImageResult::failed("c".into(), None, "bad".into()),
            graded("d", "Non-neoplasm"),
        ];
        let g = slide_grade(&classes, &imgs).unwrap();
        assert_eq!((g.grade.as_str(), g.image_uri.as_str()), ("CIN2", "b"));
        assert!(slide_grade(&classes, &imgs[2..3]).is_none());
    }
}
