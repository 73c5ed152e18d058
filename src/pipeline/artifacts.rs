//! The pictures and files that explain one graded image.

use crate::cam::{npy_f32, overlay, png_bytes, upsample_bilinear};
use crate::model::Manifest;

use super::{Graded, Prepared};

/// One class's heatmap overlay.
#[derive(Debug, Clone)]
pub struct ClassHeatmap {
    pub class: String,
    /// PNG: jet colour map of `ReLU(M_c)` blended over the preprocessed image.
    pub png: Vec<u8>,
    /// The map value (logit units) drawn as full red; 0 when the map has no positive part.
    pub scale: f32,
}

/// Everything written beside a result for one image.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub heatmaps: Vec<ClassHeatmap>,
    /// `.npy` of the un-clipped maps, shape `[classes, h, w]`, float32, logit units.
    pub raw_npy: Vec<u8>,
    pub raw_shape: [usize; 3],
}

/// Renders the overlays (maps upsampled bilinearly to the preprocessed image) and
/// the lossless raw map.
pub fn render_artifacts(prepared: &Prepared, graded: &Graded, manifest: &Manifest) -> Artifacts {
    let maps = &graded.maps;
    let (w, h) = prepared.image.dimensions();
    let heatmaps = manifest
        .classes
        .iter()
        .enumerate()
        .map(|(c, class)| {
            let up =
                upsample_bilinear(maps.map(c), maps.height, maps.width, h as usize, w as usize);
            let scale = up.iter().cloned().fold(0f32, f32::max);
            ClassHeatmap {
                class: class.clone(),
                png: png_bytes(&overlay(&prepared.image, &up, scale)),
                scale,
            }
        })
        .collect();
    let raw_shape = [maps.classes, maps.height, maps.width];
    Artifacts {
        heatmaps,
        raw_npy: npy_f32(&raw_shape, &maps.data),
        raw_shape,
    }
}
