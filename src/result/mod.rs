//! The `cinflow.result/v2` record: what the LIS (or a person) reads for a job.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{Manifest, ReferBand, Triage, CIN2_PLUS};
use crate::pipeline::{BatchInfo, Graded, Prepared, StageTimings};
use crate::preprocess::ClaheParams;
use crate::quality::ImageQuality;

pub mod codes;
pub mod fhir;

pub const RESULT_SCHEMA: &str = "cinflow.result/v2";

/// The rule that turns image grades into a slide grade (4- and 3-class
/// models): the grade of the image with the highest P(CIN2+).
pub const SLIDE_RULE: &str = "highest-p-cin2plus";
/// The same for 2-class models: the image with the highest P(CIN).
pub const SLIDE_RULE_BINARY: &str = "highest-p-cin";

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
    /// The CIN2+ triage thresholds the images and slide were triaged with,
    /// and what they reached on the validation split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refer_band: Option<ReferBand>,
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
            refer_band: m.refer_band.clone(),
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
    /// Whether `scale` is the model version's (comparable across classes and
    /// images) or the map's own maximum (bundles without a stored scale).
    pub scale_source: crate::cam::ScaleSource,
    /// The map drawn: `grad-cam` or `contrastive`.
    pub map: crate::cam::MapKind,
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
    /// Sum of the CIN2+ classes' probabilities (4- and 3-class models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p_cin2_plus: Option<f32>,
    /// `CIN2+ likely`, `refer` or `CIN2+ unlikely` (models with a refer band);
    /// `refer` whenever the image failed quality control.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub triage: Option<Triage>,
    /// Input quality measurements and the checks the image failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<ImageQuality>,
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
            p_cin2_plus: graded.p_cin2_plus,
            triage: graded.triage,
            quality: Some(graded.quality.clone()),
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
            p_cin2_plus: None,
            triage: None,
            quality: None,
            heatmaps: Vec::new(),
            preprocessed_image: None,
            raw_map: None,
            timings: None,
            batch: None,
        }
    }
}

/// The slide-level grade and triage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlideGrade {
    pub grade: String,
    pub rule: String,
    /// The image that decided the grade: the highest P(CIN2+) (P(CIN) for
    /// 2-class models).
    pub image_uri: String,
    /// The slide's P(CIN2+): that of the deciding image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p_cin2_plus: Option<f32>,
    /// The slide's triage (models with a refer band) and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub triage: Option<Triage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub triage_reason: Option<String>,
}

/// The slide grade from its graded images: the grade of the image with the
/// highest P(CIN2+) (the first on ties), or of the highest P(CIN) for 2-class
/// models. Images that failed quality control are left out while any other
/// image was graded. The slide is triaged by that P(CIN2+); a slide with images
/// that could not be graded or failed quality control is `refer` unless a
/// passing image is already `CIN2+ likely`.
pub fn slide_grade(manifest: &Manifest, images: &[ImageResult]) -> Option<SlideGrade> {
    let binary = crate::model::triage::cin2_plus_rows(&manifest.classes).is_empty();
    let score = |r: &ImageResult| -> Option<f32> {
        if binary {
            r.probabilities.as_ref()?.get(&manifest.classes[0]).copied()
        } else {
            r.p_cin2_plus
        }
    };
    let graded: Vec<(&ImageResult, f32)> = images
        .iter()
        .filter(|r| r.status == ImageStatus::Ok && r.predicted_class.is_some())
        .filter_map(|r| Some((r, score(r)?)))
        .collect();
    let passed = |r: &ImageResult| r.quality.as_ref().is_none_or(ImageQuality::passed);
    let flagged = graded.iter().filter(|(r, _)| !passed(r)).count();
    let usable: Vec<(&ImageResult, f32)> = if flagged < graded.len() {
        graded.iter().filter(|(r, _)| passed(r)).copied().collect()
    } else {
        graded.clone()
    };
    let (deciding, p) = usable.into_iter().fold(
        None,
        |best: Option<(&ImageResult, f32)>, (r, p)| match best {
            Some((_, q)) if q >= p => best,
            _ => Some((r, p)),
        },
    )?;
    let failed = images
        .iter()
        .filter(|r| r.status == ImageStatus::Error)
        .count();
    let (triage, triage_reason) = match (&manifest.refer_band, binary) {
        (Some(band), false) => {
            let (t, why) = slide_triage(band, p, failed, flagged, graded.len(), images.len());
            (Some(t), Some(why))
        }
        _ => (None, None),
    };
    Some(SlideGrade {
        grade: deciding.predicted_class.clone()?,
        rule: if binary {
            SLIDE_RULE_BINARY
        } else {
            SLIDE_RULE
        }
        .into(),
        image_uri: deciding.uri.clone(),
        p_cin2_plus: (!binary).then_some(p),
        triage,
        triage_reason,
    })
}

/// A slide's triage from its highest P(CIN2+) `p` (over the images that
/// passed quality control, if any did), and the reason in words.
fn slide_triage(
    band: &ReferBand,
    p: f32,
    failed: usize,
    flagged: usize,
    graded: usize,
    images: usize,
) -> (Triage, String) {
    let (lo, hi) = (band.rule_out.threshold, band.rule_in.threshold);
    let by_p = band.triage(f64::from(p));
    let why = match by_p {
        Triage::Likely => format!(
            "highest P({CIN2_PLUS}) {p:.3} is at or above the rule-in threshold {hi:.3}"
        ),
        Triage::Unlikely => format!(
            "every image's P({CIN2_PLUS}) is below the rule-out threshold {lo:.3} (highest {p:.3})"
        ),
        Triage::Refer => format!(
            "highest P({CIN2_PLUS}) {p:.3} lies between the rule-out threshold {lo:.3} and the rule-in threshold {hi:.3}"
        ),
    };
    if flagged == graded {
        let why = format!(
            "no image passed quality control ({flagged} of {images} flagged); the flagged ones alone: {by_p} ({why})"
        );
        return (Triage::Refer, why);
    }
    let mut missing = Vec::new();
    if failed > 0 {
        missing.push(format!("{failed} of {images} images could not be graded"));
    }
    if flagged > 0 {
        missing.push(format!(
            "{flagged} of {images} images failed quality control and were left out"
        ));
    }
    if !missing.is_empty() && by_p != Triage::Likely {
        let why = format!("{} (the others alone: {by_p}; {why})", missing.join("; "));
        return (Triage::Refer, why);
    }
    if !missing.is_empty() {
        return (by_p, format!("{why}; {}", missing.join("; ")));
    }
    (by_p, why)
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

/// A `cinflow.result/v2` record.
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
    /// The result viewer page written beside it (worker results): every image
    /// with any class's overlay, readable in a browser without a server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub viewer_uri: Option<String>,
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
            viewer_uri: None,
            model: ModelInfo::from_manifest(manifest),
            preprocess: PreprocessInfo::from_manifest(manifest),
            execution_provider: provider.into(),
            slide_grade: slide_grade(manifest, &images),
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
    use crate::model::OperatingPoint;

    fn graded(uri: &str, class: &str, p: f32) -> ImageResult {
        ImageResult {
            predicted_class: Some(class.into()),
            p_cin2_plus: Some(p),
            status: ImageStatus::Ok,
            error: None,
            ..ImageResult::failed(uri.into(), None, String::new())
        }
    }

    fn manifest(band: bool) -> Manifest {
        let point = |threshold| OperatingPoint {
            threshold,
            target: 0.95,
            sensitivity: 0.95,
            specificity: 0.95,
        };
        let mut m = Manifest::example();
        m.refer_band = band.then(|| ReferBand {
            classes: vec!["CIN3".into(), "CIN2".into()],
            fitted_on: "validation".into(),
            positives: 20,
            negatives: 20,
            rule_out: point(0.2),
            rule_in: point(0.7),
        });
        m
    }

    #[test]
    fn slide_grade_is_the_image_with_the_highest_p_cin2_plus() {
        let m = manifest(true);
        // "a" is predicted CIN1 but carries more CIN2+ probability than "b",
        // predicted Non-neoplasm: the slide takes a's grade.
        let imgs = vec![
            graded("b", "Non-neoplasm", 0.1),
            graded("a", "CIN1", 0.45),
            ImageResult::failed("c".into(), None, "bad".into()),
            graded("d", "CIN1", 0.45),
        ];
        let g = slide_grade(&m, &imgs).unwrap();
        assert_eq!((g.grade.as_str(), g.image_uri.as_str()), ("CIN1", "a"));
        assert_eq!(g.rule, SLIDE_RULE);
        assert_eq!(g.p_cin2_plus, Some(0.45));
        // In the band, and one image failed: refer, saying both.
        assert_eq!(g.triage, Some(Triage::Refer));
        let why = g.triage_reason.unwrap();
        assert!(
            why.starts_with("1 of 4 images could not be graded"),
            "{why}"
        );
        // A passing image decides over a flagged one with more P(CIN2+); when
        // every graded image is flagged, they decide but the slide is referred.
        let mut blurred = graded("z", "CIN3", 0.95);
        blurred.quality = Some(ImageQuality {
            measurements: crate::quality::Measurements {
                focus: 1.0,
                tissue_fraction: 0.9,
                overexposed_fraction: 0.0,
                underexposed_fraction: 0.0,
            },
            ood_distance: None,
            flags: vec![crate::quality::QcFlag {
                check: "focus".into(),
                reason: "out of focus".into(),
            }],
        });
        let low = graded("y", "Non-neoplasm", 0.05);
        let g = slide_grade(&m, &[blurred.clone(), low]).unwrap();
        assert_eq!((g.image_uri.as_str(), g.triage), ("y", Some(Triage::Refer)));
        let why = g.triage_reason.unwrap();
        assert!(
            why.starts_with("1 of 2 images failed quality control"),
            "{why}"
        );
        let g = slide_grade(&m, &[blurred]).unwrap();
        assert_eq!((g.image_uri.as_str(), g.triage), ("z", Some(Triage::Refer)));
        let why = g.triage_reason.unwrap();
        assert!(why.starts_with("no image passed quality control"), "{why}");
        assert!(slide_grade(&m, &imgs[2..3]).is_none());
        // A failed image does not hide a CIN2+ likely slide...
        let likely = [graded("x", "CIN3", 0.9), imgs[2].clone()];
        assert_eq!(
            slide_grade(&m, &likely).unwrap().triage,
            Some(Triage::Likely)
        );
        // ...but keeps an unlikely one from being called unlikely.
        let low = [graded("y", "Non-neoplasm", 0.05)];
        let g = slide_grade(&m, &low).unwrap();
        assert_eq!(g.triage, Some(Triage::Unlikely));
        assert!(g
            .triage_reason
            .unwrap()
            .contains("below the rule-out threshold 0.200"));
        let low_and_failed = [low[0].clone(), imgs[2].clone()];
        let g = slide_grade(&m, &low_and_failed).unwrap();
        assert_eq!(g.triage, Some(Triage::Refer));
        // Without a band: the grade, no triage.
        let g = slide_grade(&manifest(false), &imgs).unwrap();
        assert_eq!((g.grade.as_str(), g.triage), ("CIN1", None));
    }
}
