//! What decoding and preprocessing an image will cost in memory, read from
//! its header before anything is decoded, so a worker can admit images
//! against a memory budget.
//!
//! The peak of [`super::preprocess`] for one image holds the decoder's output
//! (the header's bytes per pixel), the 8-bit RGB copy when the decoder's output
//! is not already 8-bit RGB (3 bytes per pixel), a rotated copy when the EXIF
//! orientation asks for one (3), and CLAHE's output (3); then the small resized
//! image and tensors. JPEGs come out of libjpeg as 8-bit RGB: 6 bytes per pixel
//! in all, unrotated.

use std::io::Cursor;

use image::{ImageDecoder, ImageReader};

/// An image's size and its estimated preprocessing peak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeCost {
    pub width: u32,
    pub height: u32,
    /// Estimated peak memory of decoding and preprocessing, in MiB (at least 1).
    pub mib: u32,
}

/// Fixed part: the resizer's intermediate rows, the resized image, the
/// normalised tensor and the CAM buffers.
const FIXED_BYTES: u64 = 32 << 20;

/// The cost of preprocessing `bytes`, from the header alone; `None` when the
/// header cannot be read (decoding then fails at once with the reason,
/// without allocating pixels).
pub fn decode_cost(bytes: &[u8]) -> Option<DecodeCost> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .ok()?;
    let mut decoder = reader.into_decoder().ok()?;
    let (width, height) = decoder.dimensions();
    let color = decoder.color_type();
    let decoded = u64::from(color.bytes_per_pixel());
    let converted = if color == image::ColorType::Rgb8 {
        0
    } else {
        3
    };
    let rotated = match decoder.orientation() {
        Ok(image::metadata::Orientation::NoTransforms) | Err(_) => 0,
        Ok(_) => 3,
    };
    let px = u64::from(width) * u64::from(height);
    let total = px * (decoded + converted + rotated + 3) + FIXED_BYTES;
    let mib = total.div_ceil(1 << 20).min(u64::from(u32::MAX)) as u32;
    Some(DecodeCost { width, height, mib })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32, color: image::ColorType) -> Vec<u8> {
        let mut out = Vec::new();
        let raw = vec![0u8; (w * h) as usize * color.bytes_per_pixel() as usize];
        image::codecs::png::PngEncoder::new(&mut out)
            .write_image(&raw, w, h, color.into())
            .unwrap();
        out
    }

    use image::ImageEncoder;

    #[test]
    fn cost_grows_with_pixels_and_sample_depth() {
        let rgb = decode_cost(&png(1000, 1000, image::ColorType::Rgb8)).unwrap();
        assert_eq!((rgb.width, rgb.height), (1000, 1000));
        // 6 bytes per pixel: 5.7 MiB, plus 32 MiB fixed.
        assert_eq!(rgb.mib, 38);
        // 6 + 3 + 3 bytes per pixel.
        let deep = decode_cost(&png(1000, 1000, image::ColorType::Rgb16)).unwrap();
        assert_eq!(deep.mib, 44);
        assert_eq!(decode_cost(b"not an image"), None);
    }
}
