//! The validation review: what a trained head does with the validation images
//! as served, beyond its figures. Each validation image goes through the
//! serving path once more (decode, quality control, CLAHE, the backbone's
//! identity view, the new head's class maps) to give the version:
//!
//! - its overlay scale ([`CamScale`]): the 99th percentile (NumPy's linear
//!   interpolation) of every class's map values at feature resolution, for
//!   Grad-CAM and for class-contrastive maps;
//! - its quality review ([`QualityReview`]): each measurement's spread and how
//!   many of these images each quality limit (and the new OOD threshold) flags.
//!
//! One backbone pass per validation image (a fraction of the 8 views per
//! image that feature extraction costs); pooled features come from the cache
//! for everything else.

use rayon::prelude::*;

use super::features::{prepare_image, read_image, FeatureError};
use super::labels::LabelRow;
use crate::cam::{class_maps, CamScale, MapKind};
use crate::model::ood::OodModel;
use crate::model::{Head, OodSpec, Task};
use crate::pipeline::Model;
use crate::quality::{ImageQuality, QualityReview};
use crate::report::levels::percentile;

/// The percentile of the validation maps drawn as full red.
pub const CAM_SCALE_PERCENTILE: f64 = 99.0;

/// One reviewed validation image.
#[derive(Debug, Clone)]
pub struct Reviewed {
    pub quality: ImageQuality,
    /// The largest Grad-CAM map value of the image, any class.
    pub map_max: f32,
}

/// What the review gives the new version.
#[derive(Debug, Clone)]
pub struct Review {
    /// None when the maps have no positive part to scale by.
    pub cam_scale: Option<CamScale>,
    pub quality: QualityReview,
    /// In the order of the rows reviewed.
    pub images: Vec<Reviewed>,
}

/// Reviews `rows` (the validation images) with the trained `head`.
pub fn review(
    model: &Model,
    head: &Head,
    task: Task,
    ood: Option<(&OodModel, &OodSpec)>,
    rows: &[&LabelRow],
    labels: &str,
) -> Result<Review, FeatureError> {
    let mut grad = Vec::new();
    let mut contrastive = Vec::new();
    let mut images = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(4) {
        let prepared: Vec<_> = chunk
            .par_iter()
            .map(|row| prepare_image(model, row, labels, &read_image(row, labels)?))
            .collect::<Result<_, FeatureError>>()?;
        for p in prepared {
            let f = model.features(&[&p])?.remove(0);
            let maps = class_maps(&f, head, task);
            let quality = match ood {
                Some((m, spec)) => p
                    .quality
                    .clone()
                    .with_ood(m.distance(&f.global_average_pool()), spec),
                None => p.quality.clone(),
            };
            images.push(Reviewed {
                quality,
                map_max: maps.data.iter().cloned().fold(f32::MIN, f32::max),
            });
            grad.extend(maps.data.iter().map(|v| f64::from(*v)));
            contrastive.extend(maps.contrastive().data.iter().map(|v| f64::from(*v)));
        }
    }
    let scale = |values: &[f64]| -> Option<f32> {
        if values.is_empty() {
            return None;
        }
        let s = percentile(values, CAM_SCALE_PERCENTILE) as f32;
        (s > 0.0).then_some(s)
    };
    let cam_scale = match (scale(&grad), scale(&contrastive)) {
        (Some(g), Some(c)) => Some(CamScale {
            grad_cam: g,
            contrastive: c,
            percentile: CAM_SCALE_PERCENTILE,
            fitted_on: "validation".into(),
            images: images.len(),
        }),
        _ => None,
    };
    let quality = QualityReview::of(
        &images.iter().map(|i| &i.quality).collect::<Vec<_>>(),
        model.manifest().quality_thresholds(),
    );
    Ok(Review {
        cam_scale,
        quality,
        images,
    })
}

/// Both scales of `scale` and where they come from, for logs.
pub fn describe(scale: &CamScale) -> String {
    format!(
        "{} {:.3}, {} {:.3} (the {}th percentile of {} validation images' maps)",
        MapKind::GradCam.name(),
        scale.grad_cam,
        MapKind::Contrastive.name(),
        scale.contrastive,
        scale.percentile,
        scale.images
    )
}
