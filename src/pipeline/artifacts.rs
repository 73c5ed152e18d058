//! What is stored to explain one graded image, and under which names: the one
//! artifact writer that `cinflow classify` and the inference worker share.
//!
//! A viewer needs the preprocessed image and the raw class maps to draw any
//! class's overlay, so those are stored for every graded image; overlays are
//! pre-drawn only for the predicted class by default (`--overlays predicted`),
//! or for every class (`all`), or not at all (`none`):
//!
//! | name | what |
//! | --- | --- |
//! | `preprocessed.jpg` | the CLAHE'd, resized image the model saw (JPEG, quality 90) |
//! | `cam.npy` | un-clipped class maps, float32 `[classes, h, w]`, logit units |
//! | `heatmap-<class>.jpg` | jet overlay of `ReLU(M_c)` (or of the class-contrastive `ReLU(C_c)`, `--heatmap contrastive`) on the preprocessed image, on the model version's fixed scale, with a legend band at the bottom (colour bar, class, P(CIN2+), triage; JPEG, quality 75) |
//!
//! The names are relative to the image's own prefix; the caller decides where
//! that is (a worker job's `images/NNN/`, a classify run's `<key>/`) and how a
//! name becomes a URI.

use bytes::Bytes;

use crate::cam::legend::{self, Legend};
use crate::cam::{
    jpeg_bytes, npy_f32, overlay, overlay_scale, upsample_bilinear, MapKind, ScaleSource,
};
use crate::model::Manifest;
use crate::result::{class_slug, HeatmapRef, ImageResult, RawMapRef};

use super::{Graded, Prepared};

/// JPEG quality of the stored preprocessed image: visually lossless for tissue.
pub const PREPROCESSED_QUALITY: u8 = 90;
/// JPEG quality of pre-drawn overlays: a view for people (any overlay can be
/// drawn again from the preprocessed image and the raw maps), so it takes the
/// smaller share of the 0.5 MB per image.
pub const OVERLAY_QUALITY: u8 = 75;

/// Name of the stored preprocessed image.
pub const PREPROCESSED_NAME: &str = "preprocessed.jpg";
/// Name of the stored raw class maps.
pub const RAW_MAP_NAME: &str = "cam.npy";

/// Name of a class's pre-drawn overlay.
pub fn heatmap_name(class: &str) -> String {
    format!("heatmap-{}.jpg", class_slug(class))
}

/// Which class overlays are pre-drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlays {
    /// None: the preprocessed image and raw maps are enough to draw any later.
    None,
    /// Only the predicted class's (the default).
    #[default]
    Predicted,
    /// Every class's.
    All,
}

/// What is pre-drawn: which classes' overlays, and of which map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Drawing {
    pub overlays: Overlays,
    pub map: MapKind,
}

/// One object to store, named relative to its image's prefix.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub name: String,
    /// Cheap to clone: a retried upload sends the same buffer.
    pub bytes: Bytes,
    pub content_type: &'static str,
}

/// A pre-drawn class overlay.
#[derive(Debug, Clone)]
struct Drawn {
    class: String,
    name: String,
    /// The map value (logit units) drawn as full red; 0 when the map has no positive part.
    scale: f32,
    scale_source: ScaleSource,
    kind: MapKind,
}

/// Everything stored for one graded image, rendered and encoded.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub artifacts: Vec<Artifact>,
    drawn: Vec<Drawn>,
    raw_shape: [usize; 3],
}

/// Renders the artifacts of one graded image. Pure CPU work (maps upsampled
/// bilinearly to the preprocessed size for the overlays).
pub fn render(
    prepared: &Prepared,
    graded: &Graded,
    manifest: &Manifest,
    drawing: Drawing,
) -> Rendered {
    let kind = drawing.map;
    let drawn_maps = graded.maps.of_kind(kind);
    let maps = &graded.maps;
    let (w, h) = prepared.image.dimensions();
    let classes: Vec<usize> = match drawing.overlays {
        Overlays::None => vec![],
        Overlays::Predicted => vec![graded.predicted],
        Overlays::All => (0..manifest.classes.len()).collect(),
    };
    let mut artifacts = vec![Artifact {
        name: PREPROCESSED_NAME.into(),
        bytes: jpeg_bytes(&prepared.image, PREPROCESSED_QUALITY).into(),
        content_type: "image/jpeg",
    }];
    let raw_shape = [maps.classes, maps.height, maps.width];
    artifacts.push(Artifact {
        name: RAW_MAP_NAME.into(),
        bytes: npy_f32(&raw_shape, &maps.data).into(),
        content_type: "application/octet-stream",
    });
    let mut drawn = Vec::new();
    for c in classes {
        let class = &manifest.classes[c];
        let up = upsample_bilinear(
            drawn_maps.map(c),
            maps.height,
            maps.width,
            h as usize,
            w as usize,
        );
        let (scale, scale_source) = overlay_scale(manifest.cam_scale.as_ref(), kind, &up);
        let name = heatmap_name(class);
        let mut drawn_image = overlay(&prepared.image, &up, scale);
        legend::draw(
            &mut drawn_image,
            &Legend {
                class,
                map: kind,
                scale,
                p_cin2_plus: graded.p_cin2_plus,
                triage: graded.triage,
            },
        );
        artifacts.push(Artifact {
            name: name.clone(),
            bytes: jpeg_bytes(&drawn_image, OVERLAY_QUALITY).into(),
            content_type: "image/jpeg",
        });
        drawn.push(Drawn {
            class: class.clone(),
            name,
            scale,
            scale_source,
            kind,
        });
    }
    Rendered {
        artifacts,
        drawn,
        raw_shape,
    }
}

impl Rendered {
    /// What the result viewer page needs of the image: where its stored
    /// preprocessed JPEG is, with `locate` turning an artifact name into a
    /// link relative to the page, and the raw maps (which the page embeds).
    pub fn viewer_image(
        &self,
        graded: &Graded,
        locate: impl Fn(&str) -> String,
    ) -> crate::viewer::ViewerImage {
        debug_assert!(self.artifacts.iter().any(|a| a.name == PREPROCESSED_NAME));
        crate::viewer::ViewerImage {
            src: locate(PREPROCESSED_NAME),
            maps: graded.maps.clone(),
        }
    }

    /// Bytes stored for the image.
    pub fn bytes(&self) -> usize {
        self.artifacts.iter().map(|a| a.bytes.len()).sum()
    }

    /// The image's result, with `locate` turning an artifact name into the URI
    /// (or relative path) the record points at.
    pub fn image_result(
        &self,
        uri: String,
        prepared: &Prepared,
        graded: &Graded,
        manifest: &Manifest,
        locate: impl Fn(&str) -> String,
    ) -> ImageResult {
        let heatmaps = self
            .drawn
            .iter()
            .map(|d| HeatmapRef {
                class: d.class.clone(),
                overlay: locate(&d.name),
                scale: d.scale,
                scale_source: d.scale_source,
                map: d.kind,
            })
            .collect();
        let raw = RawMapRef {
            uri: locate(RAW_MAP_NAME),
            shape: self.raw_shape,
            units: "logit".into(),
        };
        let mut r = ImageResult::graded(uri, prepared, graded, manifest, heatmaps, raw);
        r.preprocessed_image = Some(locate(PREPROCESSED_NAME));
        r
    }
}
