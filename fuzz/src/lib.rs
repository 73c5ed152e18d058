//! What the decoder targets share.

use cinflow::preprocess::{decode_with_limit, PreprocessError};

/// Pixel limit of the decoder targets: 1 megapixel, so an accepted image needs a few
/// MB at most and a header bomb that slipped past the check would show up as an
/// out-of-memory report.
pub const MAX_PIXELS: u64 = 1 << 20;

/// Decodes `data` with the limit; an image must be within the limit and consistent.
pub fn decode(data: &[u8]) {
    match decode_with_limit(data, MAX_PIXELS) {
        Ok(img) => {
            let (w, h) = img.dimensions();
            assert!(
                u64::from(w) * u64::from(h) <= MAX_PIXELS,
                "{w}x{h} passed the limit"
            );
            assert!(w > 0 && h > 0, "empty image accepted");
            assert_eq!(img.as_raw().len(), w as usize * h as usize * 3);
        }
        Err(PreprocessError::TooLarge { width, height, .. }) => {
            assert!(u64::from(width) * u64::from(height) > MAX_PIXELS);
        }
        Err(_) => {}
    }
}
