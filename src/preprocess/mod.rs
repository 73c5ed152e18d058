//! Preprocessing: image bytes -> 8-bit RGB -> CLAHE (every channel) -> resize -> CHW float.
//!
//! Training and serving share this code bit for bit; [`PREPROCESS_VERSION`] names its output
//! and goes into feature-cache keys and result records, so any change to the output bytes
//! must bump it.
//!
//! The reference is the OpenCV path of the research code:
//! `cv2.imdecode` -> `cv2.createCLAHE(clip, grid).apply` on each channel ->
//! `cv2.resize(..., interpolation=cv2.INTER_AREA)`. [`clahe_rgb`] reproduces OpenCV's CLAHE
//! exactly (same integer clipping, same `f32` interpolation and rounding); [`resize`] is an
//! area-average resize that stays within one grey level of `INTER_AREA`
//! (`tests/preprocess_opencv.rs` checks both against OpenCV on real-size images).
//!
//! JPEG pixels come from libjpeg-turbo, as in `cv2.imdecode`, and are identical to OpenCV's
//! for YCbCr, greyscale, CMYK and YCCK files (CMYK through OpenCV's own integer conversion);
//! PNG and TIFF go through the `image` crate.

mod budget;
mod clahe;
mod decode;
mod normalise;
mod resize;

pub use budget::{decode_cost, DecodeCost};
pub use clahe::clahe_rgb;
pub use decode::{decode, decode_with_limit, MAX_PIXELS};
pub use normalise::normalise_into;
pub use resize::resize;

use image::RgbImage;

/// Version of the preprocessing output; bump whenever the output bytes change.
pub const PREPROCESS_VERSION: &str = "cinflow-preprocess/1";

/// Parameters of contrast-limited adaptive histogram equalisation, as `cv2.createCLAHE` takes.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClaheParams {
    /// Contrast limit relative to a flat histogram; `<= 0` disables clipping.
    pub clip_limit: f64,
    /// Number of tiles as `[cols (x), rows (y)]`.
    pub tile_grid: [u32; 2],
}

impl Default for ClaheParams {
    /// OpenCV's defaults: clip limit 40, 8x8 tiles.
    fn default() -> Self {
        Self {
            clip_limit: 40.0,
            tile_grid: [8, 8],
        }
    }
}

/// Everything that determines the preprocessed 8-bit image.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PreprocessConfig {
    /// Output width in pixels.
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
    /// CLAHE parameters applied to each channel before resizing.
    pub clahe: ClaheParams,
}

impl Default for PreprocessConfig {
    /// 800 x 600 with OpenCV's default CLAHE, the input size of the published models.
    fn default() -> Self {
        Self {
            width: 800,
            height: 600,
            clahe: ClaheParams::default(),
        }
    }
}

/// Why an image could not be preprocessed. Every variant is permanent: it is a property of
/// the input bytes, so retrying the same job cannot succeed.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// Recognised as an image format that we do not accept, or not recognised at all.
    #[error("unsupported image format: {0} (expected JPEG, PNG or TIFF)")]
    UnsupportedFormat(String),
    /// The decoder rejected the data.
    #[error("not an image / undecodable: {0}")]
    Undecodable(String),
    /// The data stops before the end of the image.
    #[error("truncated: {0}")]
    Truncated(String),
    /// The header announces more pixels than the limit; refused before any allocation.
    #[error("image too large: {width}x{height} exceeds limit of {max_pixels} pixels")]
    TooLarge {
        width: u32,
        height: u32,
        max_pixels: u64,
    },
    /// A sample layout that we do not convert to 8-bit RGB (float, CMYK, ...).
    #[error("unsupported pixel type {0}")]
    UnsupportedPixelType(String),
    /// Zero width or height.
    #[error("empty image: {width}x{height}")]
    Empty { width: u32, height: u32 },
    /// Decoding it alone would need more memory than the worker's whole budget.
    #[error("image too large for this worker: {width}x{height} needs about {need_mib} MiB to decode and preprocess, more than the whole memory budget of {budget_mib} MiB (--memory-budget-mb)")]
    OverBudget {
        width: u32,
        height: u32,
        need_mib: u32,
        budget_mib: u32,
    },
}

impl crate::retry::Transient for PreprocessError {
    /// Always `false`: a preprocessing failure depends only on the input bytes.
    fn is_transient(&self) -> bool {
        false
    }
}

/// Decodes, applies CLAHE to every channel and resizes: the 8-bit image the model sees.
pub fn preprocess(bytes: &[u8], cfg: &PreprocessConfig) -> Result<RgbImage, PreprocessError> {
    let img = decode(bytes)?;
    Ok(preprocess_image(&img, cfg))
}

/// CLAHE then resize on an already decoded image.
pub fn preprocess_image(img: &RgbImage, cfg: &PreprocessConfig) -> RgbImage {
    let equalised = clahe_rgb(img, &cfg.clahe);
    resize(&equalised, cfg.width, cfg.height)
}
