//! Area-average resize (OpenCV's `INTER_AREA`) on fast_image_resize's SIMD convolution.
//!
//! Why area: the 2560x1920 -> 800x600 downscale must be anti-aliased, and `cv2.INTER_AREA`
//! is what the research code's OpenCV path uses for it. `INTER_AREA` weighs every source
//! pixel by the fraction of it that the destination pixel covers (3.2 source pixels per
//! output pixel here, so partial pixels at both ends). fast_image_resize's `Box` filter
//! weighs pixels whose centres fall inside the footprint fully and the others not at all,
//! which differs from `INTER_AREA` by several grey levels on textured images; so we give it
//! the exact coverage as a custom filter. Its fixed-point arithmetic (8-bit intermediate
//! between the two passes) keeps the result within one grey level of OpenCV's `f32`
//! accumulation (about one sample in eight is one level off on CLAHE'd slides; a 16-bit
//! pass would make that rare but costs about four times as much). When enlarging,
//! coverage weights are also what `INTER_AREA` uses.

use std::cell::Cell;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{Filter, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;

thread_local! {
    /// Source pixels per destination pixel along the axis being resized. fast_image_resize
    /// takes filters as plain `fn` pointers, so the scale reaches [`coverage`] this way; it
    /// computes the weights synchronously on the calling thread, one axis per call.
    static AXIS_SCALE: Cell<f64> = const { Cell::new(1.0) };
}

/// Resizes with area averaging (`cv2.INTER_AREA` semantics, within one grey level).
///
/// Returns a copy when the size is unchanged; a zero-sized request gives an empty image.
pub fn resize(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if (w, h) == (width, height) {
        return img.clone();
    }
    if w == 0 || h == 0 || width == 0 || height == 0 {
        return RgbImage::new(width, height);
    }
    let mut resizer = Resizer::new();
    // Vertical first, as fast_image_resize itself orders the passes for 8-bit images.
    let tall = resize_axis(&mut resizer, img.as_raw(), (w, h), (w, height), h, height);
    let out = resize_axis(&mut resizer, &tall, (w, height), (width, height), w, width);
    RgbImage::from_raw(width, height, out).expect("resizer output has the requested size")
}

/// One fast_image_resize call that changes one axis (`from` -> `to` pixels along it).
fn resize_axis(
    resizer: &mut Resizer,
    src: &[u8],
    (sw, sh): (u32, u32),
    (dw, dh): (u32, u32),
    from: u32,
    to: u32,
) -> Vec<u8> {
    if from == to {
        return src.to_vec();
    }
    let scale = f64::from(from) / f64::from(to);
    AXIS_SCALE.with(|s| s.set(scale));
    // Coverage is non-zero for source centres within scale / 2 + 1 / 2 of the output centre;
    // fast_image_resize measures that distance in units of max(scale, 1).
    let support = (scale / 2.0 + 0.5) / scale.max(1.0);
    let filter = Filter::new("area", coverage, support).expect("support is finite and positive");
    let options =
        ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Custom(filter)));
    let src = ImageRef::new(sw, sh, src, PixelType::U8x3).expect("buffer matches dimensions");
    let mut dst = Image::new(dw, dh, PixelType::U8x3);
    resizer
        .resize(&src, &mut dst, &options)
        .expect("same pixel type and non-empty sizes");
    dst.into_vec()
}

/// Length of the overlap between a source pixel and the destination pixel's footprint,
/// for a source centre `t * max(scale, 1)` source pixels from the destination centre.
fn coverage(t: f64) -> f64 {
    let scale = AXIS_SCALE.with(Cell::get);
    let d = t * scale.max(1.0);
    let half = scale / 2.0;
    ((d + 0.5).min(half) - (d - 0.5).max(-half)).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    /// OpenCV's `INTER_AREA` for a downscale, in f64: each output pixel is the
    /// coverage-weighted mean of the source pixels under its footprint.
    fn area_reference(img: &RgbImage, width: u32, height: u32) -> Vec<f64> {
        let weights = |from: u32, to: u32| -> Vec<Vec<(usize, f64)>> {
            let s = f64::from(from) / f64::from(to);
            (0..to)
                .map(|o| {
                    let (a, b) = (f64::from(o) * s, f64::from(o + 1) * s);
                    (a.floor() as usize..(b.ceil() as usize).min(from as usize))
                        .map(|i| (i, ((i + 1) as f64).min(b) - (i as f64).max(a)))
                        .filter(|&(_, w)| w > 0.0)
                        .map(|(i, w)| (i, w / s))
                        .collect()
                })
                .collect()
        };
        let (wx, wy) = (weights(img.width(), width), weights(img.height(), height));
        let mut out = Vec::new();
        for ys in &wy {
            for xs in &wx {
                for c in 0..3 {
                    let mut acc = 0.0;
                    for &(y, fy) in ys {
                        for &(x, fx) in xs {
                            acc += fy * fx * f64::from(img.get_pixel(x as u32, y as u32)[c]);
                        }
                    }
                    out.push(acc);
                }
            }
        }
        out
    }

    fn noise(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let n = x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503).rotate_left(13);
            Rgb([
                (n % 251) as u8,
                (n / 7 % 253) as u8,
                ((x * 4 + y) % 256) as u8,
            ])
        })
    }

    #[test]
    fn downscale_is_within_one_level_of_area_average() {
        for (w, h, dw, dh) in [(160, 120, 50, 37), (64, 48, 20, 15), (99, 10, 7, 3)] {
            let img = noise(w, h);
            let out = resize(&img, dw, dh);
            assert_eq!(out.dimensions(), (dw, dh));
            // OpenCV rounds its f32 accumulation once; we round after each pass.
            let reference = area_reference(&img, dw, dh);
            let mut off_by_one = 0;
            for (i, (&got, &want)) in out.as_raw().iter().zip(&reference).enumerate() {
                let diff = (i32::from(got) - want.round() as i32).abs();
                assert!(
                    diff <= 1,
                    "{w}x{h}->{dw}x{dh} sample {i}: {got} vs {want:.3}"
                );
                off_by_one += diff;
            }
            // The 8-bit intermediate between the passes puts pure noise one level off on
            // about a fifth of the samples; a wrong weighting would be off by far more.
            assert!(
                off_by_one * 3 < reference.len() as i32,
                "{off_by_one} of {}",
                reference.len()
            );
        }
    }

    #[test]
    fn integer_factor_is_a_box_mean() {
        let img = RgbImage::from_fn(4, 2, |x, _| Rgb([(x * 10) as u8, 100, 255]));
        let out = resize(&img, 2, 1);
        // (0 + 10) / 2 = 5, (20 + 30) / 2 = 25
        assert_eq!(out.as_raw(), &[5, 100, 255, 25, 100, 255]);
    }

    #[test]
    fn flat_stays_flat_and_same_size_is_identity() {
        let img = RgbImage::from_pixel(333, 250, Rgb([7, 130, 254]));
        assert!(resize(&img, 100, 77).pixels().all(|p| p.0 == [7, 130, 254]));
        assert!(resize(&img, 400, 300)
            .pixels()
            .all(|p| p.0 == [7, 130, 254]));
        let img = noise(30, 20);
        assert_eq!(resize(&img, 30, 20), img);
        assert_eq!(resize(&img, 0, 5).dimensions(), (0, 5));
    }

    #[test]
    fn enlarging_uses_coverage_weights() {
        // 4 -> 5 pixels: output 1 covers [0.8, 1.6) -> 0.25 of pixel 0, 0.75 of pixel 1.
        let img = RgbImage::from_fn(4, 1, |x, _| Rgb([(x * 80) as u8, 0, 0]));
        let out = resize(&img, 5, 1);
        let row: Vec<u8> = out.pixels().map(|p| p[0]).collect();
        assert_eq!(row[0], 0); // [0, 0.8): pixel 0 only
        assert!((i32::from(row[1]) - 60).abs() <= 1, "{row:?}"); // 0.25 * 0 + 0.75 * 80
        assert_eq!(row[4], 240); // [3.2, 4): pixel 3 only
    }
}
