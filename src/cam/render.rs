//! Turning class maps into pictures and files.

use image::RgbImage;

use super::jet;

/// Bilinear upsampling with half-pixel centres (OpenCV INTER_LINEAR,
/// PyTorch `align_corners=False`) of an `h x w` map to `out_h x out_w`.
pub fn upsample_bilinear(map: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    let axis = |n_in: usize, n_out: usize| -> Vec<(usize, usize, f32)> {
        let scale = n_in as f32 / n_out as f32;
        (0..n_out)
            .map(|o| {
                let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(n_in - 1);
                let i1 = (i0 + 1).min(n_in - 1);
                (i0, i1, src - i0 as f32)
            })
            .collect()
    };
    let (ys, xs) = (axis(h, out_h), axis(w, out_w));
    let mut out = Vec::with_capacity(out_h * out_w);
    for &(y0, y1, fy) in &ys {
        for &(x0, x1, fx) in &xs {
            let top = map[y0 * w + x0] * (1.0 - fx) + map[y0 * w + x1] * fx;
            let bottom = map[y1 * w + x0] * (1.0 - fx) + map[y1 * w + x1] * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

/// Blends `ReLU(map) / scale` in the jet colour map over `image` (40% heat, 60%
/// image). `map` has the image's size; `scale` is the value shown as full red.
pub fn overlay(image: &RgbImage, map: &[f32], scale: f32) -> RgbImage {
    assert_eq!(map.len(), (image.width() * image.height()) as usize);
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let mut out = image.clone();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU reported AVX2.
        unsafe { blend_avx2(&mut out, map, inv) };
        return out;
    }
    blend(&mut out, map, inv);
    out
}

/// The per-pixel blend of [`overlay`], in place.
#[inline(always)]
fn blend(rgb: &mut [u8], map: &[f32], inv: f32) {
    for (px, m) in rgb.chunks_exact_mut(3).zip(map) {
        let heat = jet(m.max(0.0) * inv);
        for (v, h) in px.iter_mut().zip(heat) {
            *v = (0.6 * f32::from(*v) + 0.4 * f32::from(h)).round() as u8;
        }
    }
}

/// [`blend`] compiled for AVX2, where `f32::round` is a few instructions instead of a
/// call into libm (six per pixel). Same IEEE `f32` arithmetic (Rust never fuses or
/// reorders it), so the output does not depend on the CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn blend_avx2(rgb: &mut [u8], map: &[f32], inv: f32) {
    blend(rgb, map, inv);
}

/// Encodes a float32 array as a NumPy `.npy` file (version 1.0, little-endian, C
/// order): lossless and readable with `numpy.load`.
pub fn npy_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    assert_eq!(shape.iter().product::<usize>(), data.len());
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // Magic (6) + version (2) + header length (2) + header must be a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + data.len() * 4);
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    bytes
}

/// Encodes an RGB image as PNG (fast compression: overlays are written per class).
pub fn png_bytes(image: &RgbImage) -> Vec<u8> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::ImageEncoder;
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
        .write_image(
            image.as_raw(),
            image.width(),
            image.height(),
            image::ExtendedColorType::Rgb8,
        )
        .expect("encoding an in-memory RGB8 image cannot fail");
    out
}

/// Encodes an RGB image as a baseline JPEG with libjpeg-turbo's fastest
/// settings (no trellis quantisation, no progressive scans): what the result
/// stores of the preprocessed image and its overlay, a few milliseconds each.
pub fn jpeg_bytes(image: &RgbImage, quality: u8) -> Vec<u8> {
    let encode = || -> std::io::Result<Vec<u8>> {
        let mut c = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
        c.set_fastest_defaults();
        c.set_size(image.width() as usize, image.height() as usize);
        c.set_quality(f32::from(quality.clamp(1, 100)));
        let capacity = (image.width() * image.height()) as usize / 4;
        let mut started = c.start_compress(Vec::with_capacity(capacity))?;
        started.write_scanlines(image.as_raw())?;
        started.finish()
    };
    std::panic::catch_unwind(encode)
        .ok()
        .and_then(Result::ok)
        .expect("encoding an in-memory RGB8 image as JPEG cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scalar blend, rounding through libm: what [`overlay`] must equal bit for bit
    /// whichever code path the CPU takes.
    #[inline(never)]
    fn reference_overlay(image: &RgbImage, map: &[f32], scale: f32) -> RgbImage {
        let mut out = image.clone();
        for (px, m) in out.pixels_mut().zip(map) {
            let heat = jet(m.max(0.0) / scale);
            for (v, h) in px.0.iter_mut().zip(heat) {
                *v = (0.6 * f32::from(*v) + 0.4 * f32::from(h)).round() as u8;
            }
        }
        out
    }

    #[test]
    fn overlay_equals_the_scalar_blend_bit_for_bit() {
        // Every grey level under every heat value, plus ties of the blend's rounding.
        let (w, h) = (256u32, 257u32);
        let image = RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([x as u8, (x as u8).wrapping_mul(3) ^ y as u8, (x + y) as u8])
        });
        let map: Vec<f32> = (0..w * h)
            .map(|i| (i % 1021) as f32 / 1000.0 - 0.01)
            .collect();
        assert_eq!(
            overlay(&image, &map, 1.0),
            reference_overlay(&image, &map, 1.0)
        );
    }

    #[test]
    fn upsampling_a_constant_is_constant_and_corners_match() {
        let up = upsample_bilinear(&[2.0; 6], 2, 3, 8, 12);
        assert!(up.iter().all(|v| (*v - 2.0).abs() < 1e-6));
        let ramp = [0.0, 1.0, 2.0, 3.0];
        let up = upsample_bilinear(&ramp, 1, 4, 1, 8);
        // Half-pixel centres: output 0 maps to source -0.25 (clamped to 0).
        assert_eq!(up[0], 0.0);
        assert!((up[1] - 0.25).abs() < 1e-6);
        assert_eq!(up[7], 3.0);
    }

    #[test]
    fn npy_header_is_aligned() {
        let b = npy_f32(&[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        assert_eq!(b.len(), 10 + hlen + 24);
        assert!(std::str::from_utf8(&b[10..10 + hlen])
            .unwrap()
            .contains("(2, 3)"));
    }

    #[test]
    fn jpeg_round_trips_within_quantisation_error() {
        let img = RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 5) as u8, 128])
        });
        let bytes = jpeg_bytes(&img, 95);
        assert_eq!(&bytes[..3], &[0xFF, 0xD8, 0xFF]);
        let back = crate::preprocess::decode(&bytes).unwrap();
        assert_eq!(back.dimensions(), (64, 48));
        let worst = img
            .as_raw()
            .iter()
            .zip(back.as_raw())
            .map(|(a, b)| (i16::from(*a) - i16::from(*b)).abs())
            .max()
            .unwrap();
        assert!(worst <= 8, "{worst}");
    }

    #[test]
    fn overlay_keeps_image_where_map_is_zero() {
        let img = RgbImage::from_pixel(2, 1, image::Rgb([100, 100, 100]));
        let out = overlay(&img, &[0.0, 10.0], 10.0);
        // zero -> jet(0) = dark blue blended; full -> dark red blended.
        assert_eq!(out.get_pixel(0, 0).0, [60, 60, 111]);
        assert_eq!(out.get_pixel(1, 0).0, [111, 60, 60]);
    }
}
