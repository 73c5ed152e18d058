//! Grad-CAM for a global-average-pooled linear head, computed exactly.
//!
//! For logits `z = W * GAP(A) + b` the gradient `dz_c / dA_kij` is `W_ck / (h*w)` at
//! every position, so Grad-CAM's channel weights are `W_ck / (h*w)` and
//! `GradCAM_c = ReLU(sum_k W_ck A_k) / (h*w)`: no backward pass is needed.
//!
//! This module keeps the map in *logit units*, `M_c = sum_k W_ck A_k` (Grad-CAM
//! times `h*w`, the class activation map of Zhou et al.). Its un-clipped mean plus
//! `b_c` is exactly the logit `z_c`, so a value reads as "this region's contribution
//! to the logit", comparable across images and models. Overlays show `ReLU(M_c)`.
//!
//! **Class-contrastive maps.** `C_c = M_c - mean_j M_j = sum_k (W_ck - mean_j W_jk) A_k`:
//! the head with its mean row subtracted, which leaves every softmax probability
//! unchanged (softmax is invariant to adding one value to every logit). `C_c`
//! shows where the evidence for class `c` exceeds the classes' average, so
//! regions that raise every logit alike (tissue in general) drop out.
//!
//! **One scale per model version.** Overlays are drawn on the scale that
//! training stored in the bundle ([`CamScale`]: a high percentile of the maps on
//! the validation split), so a faint class looks faint next to the predicted
//! one and two images compare. Bundles without it fall back to each map's own
//! maximum, and the result record says which was used.

mod colormap;
pub mod legend;
mod render;

pub use colormap::jet;
pub use render::{jpeg_bytes, npy_f32, overlay, png_bytes, upsample_bilinear};

use serde::{Deserialize, Serialize};

use crate::infer::FeatureMap;
use crate::model::{Head, Task};

/// Which map an overlay shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MapKind {
    /// Grad-CAM: the class's evidence, `ReLU(M_c)`.
    #[default]
    GradCam,
    /// Class-contrastive: the class's evidence against the classes' average, `ReLU(C_c)`.
    Contrastive,
}

impl MapKind {
    pub fn name(self) -> &'static str {
        match self {
            MapKind::GradCam => "grad-cam",
            MapKind::Contrastive => "contrastive",
        }
    }
}

/// The overlay scale of one model version: the map value drawn as full red,
/// fitted on the validation split when the head was trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CamScale {
    /// For Grad-CAM maps `M_c` (logit units).
    pub grad_cam: f32,
    /// For class-contrastive maps `C_c` (logit units).
    pub contrastive: f32,
    /// The percentile of every class's map values at feature resolution
    /// (NumPy's linear interpolation) that each scale is.
    pub percentile: f64,
    /// The split it was fitted on (`validation`) and how many images.
    pub fitted_on: String,
    pub images: usize,
}

impl CamScale {
    /// The scale for maps of `kind`.
    pub fn of(&self, kind: MapKind) -> f32 {
        match kind {
            MapKind::GradCam => self.grad_cam,
            MapKind::Contrastive => self.contrastive,
        }
    }
}

/// Where an overlay's full-red value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScaleSource {
    /// The model version's [`CamScale`]: comparable across classes and images.
    Model,
    /// The map's own maximum (bundles without a stored scale).
    MapMaximum,
}

/// The value drawn as full red in an overlay of the `kind` map `map` (at any
/// resolution): the version's scale where the bundle has one, else the map's
/// own maximum (0 when it has no positive part).
pub fn overlay_scale(scale: Option<&CamScale>, kind: MapKind, map: &[f32]) -> (f32, ScaleSource) {
    match scale {
        Some(s) => (s.of(kind), ScaleSource::Model),
        None => (
            map.iter().cloned().fold(0f32, f32::max),
            ScaleSource::MapMaximum,
        ),
    }
}

/// Un-clipped class maps at feature resolution, one per class, in logit units.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassMaps {
    pub classes: usize,
    pub height: usize,
    pub width: usize,
    /// `classes x height x width`, row-major.
    pub data: Vec<f32>,
}

impl ClassMaps {
    /// The map of class `c`.
    pub fn map(&self, c: usize) -> &[f32] {
        let a = self.height * self.width;
        &self.data[c * a..(c + 1) * a]
    }

    /// The class-contrastive maps `C_c = M_c - mean_j M_j` (see the module docs).
    /// For a binary head the two maps are `M` and `-M`, whose mean is zero, so
    /// they are their own contrastive maps.
    pub fn contrastive(&self) -> ClassMaps {
        let area = self.height * self.width;
        let mut data = self.data.clone();
        for i in 0..area {
            let mean = (0..self.classes)
                .map(|c| f64::from(self.data[c * area + i]))
                .sum::<f64>()
                / self.classes as f64;
            for c in 0..self.classes {
                data[c * area + i] = (f64::from(self.data[c * area + i]) - mean) as f32;
            }
        }
        ClassMaps { data, ..*self }
    }

    /// The maps of `kind`.
    pub fn of_kind(&self, kind: MapKind) -> std::borrow::Cow<'_, ClassMaps> {
        match kind {
            MapKind::GradCam => std::borrow::Cow::Borrowed(self),
            MapKind::Contrastive => std::borrow::Cow::Owned(self.contrastive()),
        }
    }
}

/// Computes `M_c = sum_k W_ck A_k` for every class. For a binary head (one logit
/// `z` for the first class) the second class's logit is `-z`, so its map is `-M_0`.
pub fn class_maps(features: &FeatureMap, head: &Head, task: Task) -> ClassMaps {
    assert_eq!(features.channels, head.channels, "feature channels vs head");
    let area = features.area();
    let mut data = vec![0f32; head.rows * area];
    for (r, out) in data.chunks_exact_mut(area).enumerate() {
        // f64 accumulation keeps the identity mean(M_c) + b_c = z_c within 1e-4
        // even for 2208 channels.
        let mut acc = vec![0f64; area];
        let row = &head.weight[r * head.channels..(r + 1) * head.channels];
        for (k, w) in row.iter().enumerate() {
            let w = f64::from(*w);
            for (a, v) in acc.iter_mut().zip(features.plane(k)) {
                *a += w * f64::from(*v);
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = a as f32;
        }
    }
    if task == Task::Binary {
        let negated: Vec<f32> = data.iter().map(|v| -v).collect();
        data.extend(negated);
    }
    ClassMaps {
        classes: data.len() / area,
        height: features.height,
        width: features.width,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(rows: usize, channels: usize) -> (FeatureMap, Head) {
        let (h, w) = (3, 5);
        let data: Vec<f32> = (0..channels * h * w)
            .map(|i| ((i as f32 * 0.731).sin() + 1.0) * 2.0)
            .collect();
        let weight: Vec<f32> = (0..rows * channels)
            .map(|i| (i as f32 * 1.37).cos())
            .collect();
        let bias: Vec<f32> = (0..rows).map(|r| r as f32 * 0.1 - 0.2).collect();
        (
            FeatureMap {
                channels,
                height: h,
                width: w,
                data,
            },
            Head {
                rows,
                channels,
                weight,
                bias,
            },
        )
    }

    #[test]
    fn map_mean_plus_bias_is_the_logit() {
        let (f, head) = example(4, 7);
        let logits = head.logits(&f.global_average_pool());
        let maps = class_maps(&f, &head, Task::Multiclass);
        for (c, z) in logits.iter().enumerate() {
            let m = maps.map(c);
            let mean = m.iter().map(|v| f64::from(*v)).sum::<f64>() / m.len() as f64;
            assert!((mean + f64::from(head.bias[c]) - f64::from(*z)).abs() < 1e-4);
        }
    }

    #[test]
    fn contrastive_maps_are_the_maps_of_the_mean_centred_head() {
        let (f, head) = example(4, 7);
        let mut centred = head.clone();
        for k in 0..head.channels {
            let mean = (0..head.rows)
                .map(|r| head.weight[r * head.channels + k])
                .sum::<f32>()
                / head.rows as f32;
            for r in 0..head.rows {
                centred.weight[r * head.channels + k] -= mean;
            }
        }
        let ours = class_maps(&f, &head, Task::Multiclass).contrastive();
        let theirs = class_maps(&f, &centred, Task::Multiclass);
        for (a, b) in ours.data.iter().zip(&theirs.data) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let binary = class_maps(&f, &example(1, 7).1, Task::Binary);
        assert_eq!(binary.contrastive(), binary);
    }

    #[test]
    fn binary_second_class_is_the_negated_map() {
        let (f, head) = example(1, 4);
        let maps = class_maps(&f, &head, Task::Binary);
        assert_eq!(maps.classes, 2);
        for (a, b) in maps.map(0).iter().zip(maps.map(1)) {
            assert_eq!(*a, -*b);
        }
    }

    #[test]
    fn hand_computed_single_position() {
        let f = FeatureMap {
            channels: 2,
            height: 1,
            width: 2,
            data: vec![1.0, 2.0, 3.0, -4.0],
        };
        let head = Head {
            rows: 1,
            channels: 2,
            weight: vec![2.0, 0.5],
            bias: vec![0.0],
        };
        // position 0: 2*1 + 0.5*3 = 3.5; position 1: 2*2 + 0.5*(-4) = 2.
        assert_eq!(class_maps(&f, &head, Task::Multiclass).data, vec![3.5, 2.0]);
    }
}
