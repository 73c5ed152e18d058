//! 8-bit RGB -> the model's planar float input.

use image::RgbImage;

/// Writes `img` as CHW planar `f32`, `(v / 255 - mean[c]) / std[c]`, into `out`.
///
/// `out` holds the three planes R, G, B one after the other; its length must be
/// `3 * width * height` (one image of an `N x 3 x H x W` batch).
///
/// # Panics
/// If `out` has another length.
pub fn normalise_into(img: &RgbImage, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    let plane = img.width() as usize * img.height() as usize;
    assert_eq!(
        out.len(),
        3 * plane,
        "output holds {} floats, a {}x{} RGB image needs {}",
        out.len(),
        img.width(),
        img.height(),
        3 * plane
    );
    // 256 values per channel: a table lookup per sample instead of a divide.
    let tables: [[f32; 256]; 3] =
        std::array::from_fn(|c| std::array::from_fn(|v| (v as f32 / 255.0 - mean[c]) / std[c]));
    let (r, gb) = out.split_at_mut(plane);
    let (g, b) = gb.split_at_mut(plane);
    for (((px, r), g), b) in img.as_raw().chunks_exact(3).zip(r).zip(g).zip(b) {
        *r = tables[0][usize::from(px[0])];
        *g = tables[1][usize::from(px[1])];
        *b = tables[2][usize::from(px[2])];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn planar_and_scaled() {
        let img = RgbImage::from_fn(3, 2, |x, y| Rgb([(x * 100) as u8, (y * 255) as u8, 51]));
        let mean = [0.485, 0.456, 0.406];
        let std = [0.229, 0.224, 0.225];
        let mut out = vec![f32::NAN; 18];
        normalise_into(&img, mean, std, &mut out);
        for (i, p) in img.pixels().enumerate() {
            for c in 0..3 {
                let want = (f32::from(p[c]) / 255.0 - mean[c]) / std[c];
                assert_eq!(out[c * 6 + i], want);
            }
        }
        // Pixel (2, 0) is R = 200: (200 / 255 - 0.485) / 0.229.
        assert!((out[2] - (200.0 / 255.0 - 0.485) / 0.229).abs() < 1e-6);
        // Identity normalisation gives v / 255.
        normalise_into(&img, [0.0; 3], [1.0; 3], &mut out);
        assert_eq!(out[6 + 3], 1.0); // G plane, pixel (0, 1)
        assert_eq!(out[12], 0.2); // B plane: 51 / 255
    }

    #[test]
    #[should_panic(expected = "needs 18")]
    fn wrong_length_panics() {
        let img = RgbImage::new(3, 2);
        normalise_into(&img, [0.0; 3], [1.0; 3], &mut [0.0; 17]);
    }
}
