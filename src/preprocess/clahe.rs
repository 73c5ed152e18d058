//! Contrast-limited adaptive histogram equalisation with OpenCV's exact 8-bit semantics.
//!
//! Same result as `cv2.createCLAHE(clip, grid).apply` on each channel of an RGB image, byte
//! for byte: OpenCV's tile geometry (including its BORDER_REFLECT_101 padding when the size
//! does not divide), integer clipping with its residual rule, `f32` LUT scaling and the same
//! `f32` bilinear expression, rounded half to even. It runs on the interleaved image, so
//! there is no split or merge, and the histograms of all three channels fill in one pass.

use image::RgbImage;

use super::ClaheParams;

/// Number of grey levels, OpenCV's `histSize` for 8-bit images.
const BINS: usize = 256;
/// One tile's LUTs, one per channel.
const TILE_LUT: usize = 3 * BINS;
/// Samples per gather/blend block of the interpolation: whole pixels, fits in L1.
const BLOCK: usize = 3 * 64;

/// Applies CLAHE to each of the three channels independently, as OpenCV would.
///
/// A zero in `tile_grid` is treated as one tile.
pub fn clahe_rgb(img: &RgbImage, p: &ClaheParams) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return img.clone();
    }
    let grid = Grid::new(w as usize, h as usize, p.tile_grid);
    let luts = tile_luts(img.as_raw(), &grid, p.clip_limit);
    let mut out = vec![0u8; img.as_raw().len()];
    interpolate(img.as_raw(), &grid, &luts, &mut out);
    RgbImage::from_raw(w, h, out).expect("output has the input's size")
}

/// Tile geometry, as `CLAHE_Impl::apply` derives it.
struct Grid {
    width: usize,
    height: usize,
    tiles_x: usize,
    tiles_y: usize,
    tile_w: usize,
    tile_h: usize,
}

impl Grid {
    fn new(width: usize, height: usize, tile_grid: [u32; 2]) -> Self {
        let tiles_x = (tile_grid[0] as usize).max(1);
        let tiles_y = (tile_grid[1] as usize).max(1);
        // OpenCV pads for the histograms unless BOTH sides divide, and then pads each side by
        // `tiles - size % tiles`: a side that divides gains a whole extra tile's worth.
        let (pw, ph) = if width % tiles_x == 0 && height % tiles_y == 0 {
            (width, height)
        } else {
            (
                width + tiles_x - width % tiles_x,
                height + tiles_y - height % tiles_y,
            )
        };
        Self {
            width,
            height,
            tiles_x,
            tiles_y,
            tile_w: pw / tiles_x,
            tile_h: ph / tiles_y,
        }
    }
}

/// OpenCV's `borderInterpolate` for BORDER_REFLECT_101 (`gfedcb|abcdefgh|gfedcba`).
fn reflect101(p: usize, len: usize) -> usize {
    if len == 1 {
        return 0;
    }
    let (mut p, len) = (p as isize, len as isize);
    while p < 0 || p >= len {
        p = if p < 0 { -p } else { 2 * len - 2 - p };
    }
    p as usize
}

/// OpenCV's clip limit in pixels per bin; 0 disables clipping.
fn clip_pixels(clip_limit: f64, tile_area: usize) -> u32 {
    if clip_limit > 0.0 {
        // Truncation toward zero, like `static_cast<int>`; saturates instead of overflowing.
        ((clip_limit * tile_area as f64 / BINS as f64) as u32).max(1)
    } else {
        0
    }
}

/// The LUTs of every tile: `luts[((ty * tiles_x + tx) * 3 + c) * 256 + v]`.
fn tile_luts(src: &[u8], g: &Grid, clip_limit: f64) -> Vec<u8> {
    let area = g.tile_w * g.tile_h;
    let clip = clip_pixels(clip_limit, area);
    // `static_cast<float>(histSize - 1) / tileSizeTotal`, in f32 as OpenCV has it.
    let scale = (BINS - 1) as f32 / area as f32;
    let stride = 3 * g.width;
    let mut luts = vec![0u8; g.tiles_x * g.tiles_y * TILE_LUT];
    for (k, lut) in luts.chunks_exact_mut(TILE_LUT).enumerate() {
        let (ty, tx) = (k / g.tiles_x, k % g.tiles_x);
        let (x0, x1) = (tx * g.tile_w, (tx + 1) * g.tile_w);
        let mut hist = RgbHistogram::default();
        for py in ty * g.tile_h..(ty + 1) * g.tile_h {
            let sy = reflect101(py, g.height);
            let row = &src[sy * stride..(sy + 1) * stride];
            let inside = x1.min(g.width);
            if x0 < inside {
                hist.count(&row[3 * x0..3 * inside]);
            }
            for px in x0.max(g.width)..x1 {
                let sx = reflect101(px, g.width);
                hist.count(&row[3 * sx..3 * sx + 3]);
            }
        }
        for (hc, out) in hist.merged().iter_mut().zip(lut.chunks_exact_mut(BINS)) {
            equalise(hc, clip, scale, out);
        }
    }
    luts
}

/// Histograms of the three channels of one tile. Even and odd pixels count into separate
/// copies: neighbouring pixels often share a value, and incrementing the same counter
/// back to back stalls on the previous increment.
struct RgbHistogram {
    even: [[u32; BINS]; 3],
    odd: [[u32; BINS]; 3],
}

impl Default for RgbHistogram {
    fn default() -> Self {
        Self {
            even: [[0; BINS]; 3],
            odd: [[0; BINS]; 3],
        }
    }
}

impl RgbHistogram {
    /// Adds interleaved RGB samples.
    fn count(&mut self, rgb: &[u8]) {
        let [r, g, b] = &mut self.even;
        let [r2, g2, b2] = &mut self.odd;
        let mut pairs = rgb.chunks_exact(6);
        for px in &mut pairs {
            r[usize::from(px[0])] += 1;
            g[usize::from(px[1])] += 1;
            b[usize::from(px[2])] += 1;
            r2[usize::from(px[3])] += 1;
            g2[usize::from(px[4])] += 1;
            b2[usize::from(px[5])] += 1;
        }
        if let [pr, pg, pb] = *pairs.remainder() {
            r[usize::from(pr)] += 1;
            g[usize::from(pg)] += 1;
            b[usize::from(pb)] += 1;
        }
    }

    fn merged(mut self) -> [[u32; BINS]; 3] {
        for (even, odd) in self.even.iter_mut().zip(&self.odd) {
            for (e, o) in even.iter_mut().zip(odd) {
                *e += o;
            }
        }
        self.even
    }
}

/// Clips and redistributes one histogram, then writes its equalisation LUT
/// (`CLAHE_CalcLut_Body` for 8-bit).
fn equalise(hist: &mut [u32; BINS], clip: u32, scale: f32, lut: &mut [u8]) {
    if clip > 0 {
        let mut clipped = 0;
        for h in hist.iter_mut() {
            if *h > clip {
                clipped += *h - clip;
                *h = clip;
            }
        }
        let batch = clipped / BINS as u32;
        let residual = clipped as usize - batch as usize * BINS;
        for h in hist.iter_mut() {
            *h += batch;
        }
        // The remainder goes one pixel per bin, every BINS / residual bins from bin 0.
        if let Some(step) = BINS.checked_div(residual) {
            for i in (0..BINS).step_by(step.max(1)).take(residual) {
                hist[i] += 1;
            }
        }
    }
    let mut sum = 0u32;
    for (h, out) in hist.iter().zip(lut.iter_mut()) {
        sum += h;
        *out = (sum as f32 * scale).round_ties_even().clamp(0.0, 255.0) as u8;
    }
}

/// OpenCV's interpolation coordinate along one axis: the lower neighbouring tile centre
/// (unclamped, so -1 before the first centre) and the weight of the upper one.
fn tile_coord(pos: usize, inv_tile: f32) -> (isize, f32) {
    let t = pos as f32 * inv_tile - 0.5;
    let lower = t.floor();
    (lower as isize, t - lower)
}

/// Column data that every row reuses: each pixel's segment (index of the pair of tile
/// columns it blends, 0..=tiles_x) and each sample's two horizontal weights.
struct Columns {
    segment: Vec<usize>,
    w_left: Vec<f32>,
    w_right: Vec<f32>,
}

impl Columns {
    fn new(g: &Grid) -> Self {
        let inv_tw = 1.0f32 / g.tile_w as f32;
        let mut cols = Self {
            segment: Vec::with_capacity(g.width),
            w_left: Vec::with_capacity(3 * g.width),
            w_right: Vec::with_capacity(3 * g.width),
        };
        for x in 0..g.width {
            let (tx, xa) = tile_coord(x, inv_tw);
            cols.segment.push((tx + 1) as usize);
            for _ in 0..3 {
                cols.w_left.push(1.0 - xa);
                cols.w_right.push(xa);
            }
        }
        cols
    }
}

/// For the rows between two tile-centre rows (`band` = upper tile row + 1, 0..=tiles_y),
/// packs the four neighbouring LUT values of every segment, channel and grey level into one
/// `u32` (top-left, top-right, bottom-left, bottom-right from the low byte up), so each
/// sample needs one lookup instead of four.
fn fill_band(luts: &[u8], g: &Grid, band: usize, table: &mut [[u32; TILE_LUT]]) {
    let ty1 = band.saturating_sub(1);
    let ty2 = band.min(g.tiles_y - 1);
    let lut = |ty: usize, tx: usize| &luts[(ty * g.tiles_x + tx) * TILE_LUT..][..TILE_LUT];
    for (segment, seg_table) in table.iter_mut().enumerate() {
        let tx1 = segment.saturating_sub(1);
        let tx2 = segment.min(g.tiles_x - 1);
        let (a, b, c, d) = (lut(ty1, tx1), lut(ty1, tx2), lut(ty2, tx1), lut(ty2, tx2));
        for (i, t) in seg_table.iter_mut().enumerate() {
            *t = u32::from_le_bytes([a[i], b[i], c[i], d[i]]);
        }
    }
}

/// `CLAHE_Interpolation_Body` for 8-bit: bilinear blend of the four neighbouring tile LUTs.
fn interpolate(src: &[u8], g: &Grid, luts: &[u8], out: &mut [u8]) {
    let n = 3 * g.width;
    let cols = Columns::new(g);
    let inv_th = 1.0f32 / g.tile_h as f32;
    let mut table = vec![[0u32; TILE_LUT]; g.tiles_x + 1];
    let mut current_band = usize::MAX;
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::is_x86_feature_detected!("avx2");
    for (y, (srow, orow)) in src.chunks_exact(n).zip(out.chunks_exact_mut(n)).enumerate() {
        let (ty, ya) = tile_coord(y, inv_th);
        let band = (ty + 1) as usize;
        if band != current_band {
            fill_band(luts, g, band, &mut table);
            current_band = band;
        }
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU reported AVX2.
            unsafe { interpolate_row_avx2(srow, &cols, &table, ya, orow) };
            continue;
        }
        interpolate_row(srow, &cols, &table, ya, orow);
    }
}

/// [`interpolate_row`] compiled for AVX2: the blend runs eight lanes wide instead of four.
/// The arithmetic is the same IEEE `f32` (Rust never fuses or reorders it), so the output
/// does not depend on the CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn interpolate_row_avx2(
    src: &[u8],
    cols: &Columns,
    table: &[[u32; TILE_LUT]],
    ya: f32,
    out: &mut [u8],
) {
    interpolate_row(src, cols, table, ya, out)
}

/// One row, in blocks: gather the packed LUT values, then blend them.
#[inline(always)]
fn interpolate_row(src: &[u8], cols: &Columns, table: &[[u32; TILE_LUT]], ya: f32, out: &mut [u8]) {
    let mut packed = [0u32; BLOCK];
    for start in (0..src.len()).step_by(BLOCK) {
        let end = (start + BLOCK).min(src.len());
        let packed = &mut packed[..end - start];
        let segments = &cols.segment[start / 3..end / 3];
        for ((p, px), &segment) in packed
            .chunks_exact_mut(3)
            .zip(src[start..end].chunks_exact(3))
            .zip(segments)
        {
            // Fixed-size tables: one bounds check per pixel, none per channel.
            let t = &table[segment];
            p[0] = t[usize::from(px[0])];
            p[1] = t[BINS + usize::from(px[1])];
            p[2] = t[2 * BINS + usize::from(px[2])];
        }
        blend(
            packed,
            &cols.w_left[start..end],
            &cols.w_right[start..end],
            ya,
            &mut out[start..end],
        );
    }
}

/// The arithmetic of OpenCV's interpolation, in its order and in `f32`, then `cvRound`.
/// Kept free of lookups so that it vectorises.
#[inline(always)]
fn blend(packed: &[u32], w_left: &[f32], w_right: &[f32], ya: f32, out: &mut [u8]) {
    // Adding 2^23 rounds a value in [0, 2^23) to an integer, half to even, and leaves that
    // integer in the low mantissa bits.
    const MAGIC: f32 = 8_388_608.0;
    const MAGIC_BITS: u32 = 0x4B00_0000;
    let ya1 = 1.0 - ya;
    let n = packed
        .len()
        .min(w_left.len())
        .min(w_right.len())
        .min(out.len());
    for i in 0..n {
        let p = packed[i];
        let byte = |shift: u32| ((p >> shift) & 0xFF) as i32 as f32;
        let (xa1, xa) = (w_left[i], w_right[i]);
        let res = (byte(0) * xa1 + byte(8) * xa) * ya1 + (byte(16) * xa1 + byte(24) * xa) * ya;
        // res <= 255 * (1 + a few ulp), so the rounded value fits in the low byte.
        out[i] = (res + MAGIC).to_bits().wrapping_sub(MAGIC_BITS) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn params(clip_limit: f64, tiles: u32) -> ClaheParams {
        ClaheParams {
            clip_limit,
            tile_grid: [tiles, tiles],
        }
    }

    /// A deterministic texture with every channel different.
    fn texture(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let n = (x.wrapping_mul(73_856_093) ^ y.wrapping_mul(19_349_663)) % 41;
            Rgb([
                (x * 3 + n) as u8,
                (y * 2 + 40 + n) as u8,
                ((x + y) / 2 + 3 * n) as u8,
            ])
        })
    }

    /// OpenCV's algorithm written out plainly, one channel at a time: pad the plane,
    /// one LUT per tile, four lookups per pixel.
    fn reference(img: &RgbImage, p: &ClaheParams) -> RgbImage {
        let g = Grid::new(img.width() as usize, img.height() as usize, p.tile_grid);
        let (pw, ph) = (g.tile_w * g.tiles_x, g.tile_h * g.tiles_y);
        let area = g.tile_w * g.tile_h;
        let clip = clip_pixels(p.clip_limit, area);
        let scale = 255.0f32 / area as f32;
        let mut out = img.clone();
        for c in 0..3 {
            let padded = |x: usize, y: usize| {
                img.get_pixel(
                    reflect101(x, g.width) as u32,
                    reflect101(y, g.height) as u32,
                )[c]
            };
            let mut luts = vec![[0u8; BINS]; g.tiles_x * g.tiles_y];
            for ty in 0..g.tiles_y {
                for tx in 0..g.tiles_x {
                    let mut hist = [0u32; BINS];
                    for y in ty * g.tile_h..(ty + 1) * g.tile_h {
                        for x in tx * g.tile_w..(tx + 1) * g.tile_w {
                            hist[usize::from(padded(x, y))] += 1;
                        }
                    }
                    equalise(&mut hist, clip, scale, &mut luts[ty * g.tiles_x + tx]);
                }
            }
            assert!(pw >= g.width && ph >= g.height);
            for y in 0..g.height {
                let tyf = y as f32 * (1.0 / g.tile_h as f32) - 0.5;
                let ty1 = tyf.floor() as isize;
                let ya = tyf - ty1 as f32;
                let (t1, t2) = (ty1.max(0) as usize, ((ty1 + 1) as usize).min(g.tiles_y - 1));
                for x in 0..g.width {
                    let txf = x as f32 * (1.0 / g.tile_w as f32) - 0.5;
                    let tx1 = txf.floor() as isize;
                    let xa = txf - tx1 as f32;
                    let (s1, s2) = (tx1.max(0) as usize, ((tx1 + 1) as usize).min(g.tiles_x - 1));
                    let v = usize::from(img.get_pixel(x as u32, y as u32)[c]);
                    let l = |ty: usize, tx: usize| f32::from(luts[ty * g.tiles_x + tx][v]);
                    let res = (l(t1, s1) * (1.0 - xa) + l(t1, s2) * xa) * (1.0 - ya)
                        + (l(t2, s1) * (1.0 - xa) + l(t2, s2) * xa) * ya;
                    out.get_pixel_mut(x as u32, y as u32)[c] = res.round_ties_even() as u8;
                }
            }
        }
        out
    }

    #[test]
    fn flat_image_maps_to_its_clipped_cdf() {
        // 64x64, 8x8 tiles of 8x8 = 64 pixels, clip 40 -> clip = int(40 * 64 / 256) = 10.
        // The spike of 64 at v = 100 is cut to 10; the 54 excess pixels are fewer than 256, so
        // no batch, and the residual rule adds one to every max(256 / 54, 1) = 4th bin from 0:
        // bins 0, 4, ..., 212. cdf(100) = 26 (bins 0..=100 step 4) + 10 = 36, and the LUT is
        // round(36 * 255 / 64) = round(143.44) = 143. Every tile agrees, so the image is flat.
        let img = RgbImage::from_pixel(64, 64, Rgb([100, 100, 100]));
        let out = clahe_rgb(&img, &ClaheParams::default());
        assert!(out.pixels().all(|p| p.0 == [143, 143, 143]));

        // v = 3 (not a residual bin): cdf = 1 (bin 0) + 10 = 11 -> round(43.83) = 44.
        // v = 255 (past the last residual bin): cdf = 54 + 10 = 64 -> 255.
        let img = RgbImage::from_pixel(64, 64, Rgb([3, 255, 0]));
        let out = clahe_rgb(&img, &ClaheParams::default());
        // v = 0: cdf = 1 + 10 = 11 -> 44 as well.
        assert!(out.pixels().all(|p| p.0 == [44, 255, 44]));
    }

    #[test]
    fn two_level_image_blends_across_the_edge() {
        // Left half 50, right half 200, 8x8 tiles of 8 px: tiles 0-3 hold only 50, 4-7 only
        // 200. As above (clip 10, residual bins 0, 4, ..., 212):
        //   a 50-tile maps 50 to round((13 + 10) * 255 / 64) = round(91.64) = 92,
        //   a 200-tile maps 50 to round(13 * 255 / 64) = round(51.80) = 52,
        //   a 200-tile maps 200 to round((51 + 10) * 255 / 64) = round(243.05) = 243,
        //   a 50-tile maps 200 to round((51 + 10) * 255 / 64) as well: the spike at 50 is
        //   below 200, so cdf(200) counts it too -> 243.
        // Column x weighs tile floor(x / 8 - 0.5) and the next by xa = x / 8 - 0.5 - floor.
        let img = RgbImage::from_fn(64, 64, |x, _| {
            let v = if x < 32 { 50 } else { 200 };
            Rgb([v, v, v])
        });
        let out = clahe_rgb(&img, &ClaheParams::default());
        let row: Vec<u8> = (0..64).map(|x| out.get_pixel(x, 17)[0]).collect();
        assert_eq!(&row[..28], &[92; 28]); // up to the centre of tile 3 (x = 28)
        assert_eq!(row[29], 87); // xa = 0.125: 92 * 0.875 + 52 * 0.125 = 87.0
        assert_eq!(row[30], 82); // xa = 0.25: 82.0
        assert_eq!(row[31], 77); // xa = 0.375: 77.0
        assert_eq!(&row[32..], &[243; 32]); // 200 maps to 243 in both kinds of tile
        assert!(out
            .rows()
            .all(|r| r.zip(row.iter()).all(|(p, &v)| p.0 == [v, v, v])));
    }

    #[test]
    fn huge_clip_limit_is_plain_equalisation() {
        // One tile and nothing clipped: global histogram equalisation, round(cdf * 255 / N).
        // N = 41 * 29 is odd, so cdf * 255 / N is never a tie and f32 rounds like exact maths.
        let img = texture(41, 29);
        let out = clahe_rgb(&img, &params(1e9, 1));
        let n = 41 * 29;
        for c in 0..3 {
            let mut cdf = [0u32; 256];
            for p in img.pixels() {
                cdf[usize::from(p[c])] += 1;
            }
            for v in 1..256 {
                cdf[v] += cdf[v - 1];
            }
            for (p, q) in img.pixels().zip(out.pixels()) {
                let expected = (cdf[usize::from(p[c])] * 255 + n / 2) / n;
                assert_eq!(u32::from(q[c]), expected, "channel {c}, value {}", p[c]);
            }
        }
        // Clipping disabled (clip_limit <= 0) is the same thing.
        assert_eq!(clahe_rgb(&img, &params(0.0, 1)), out);
    }

    #[test]
    fn tiny_clip_limit_is_near_identity() {
        // clip = 1: every occupied bin keeps one pixel and the rest is spread evenly, so the
        // histogram is close to flat and the LUT close to v -> v (here within 2 levels).
        let img = texture(256, 256);
        let out = clahe_rgb(&img, &params(0.01, 2));
        let worst = img
            .as_raw()
            .iter()
            .zip(out.as_raw())
            .map(|(&a, &b)| (i32::from(a) - i32::from(b)).abs())
            .max()
            .unwrap();
        assert!(worst <= 2, "max deviation {worst}");
    }

    #[test]
    fn matches_plain_reference_on_awkward_sizes() {
        for (w, h, tiles, clip) in [
            (64, 48, [8, 8], 40.0), // divisible: no padding
            (37, 23, [8, 8], 40.0), // neither side divides
            (64, 23, [8, 8], 2.0),  // width divides, height does not: OpenCV pads both
            (37, 48, [8, 4], 3.0),
            (5, 3, [8, 8], 40.0), // smaller than the grid: tiles of one pixel in the padding
            (1, 1, [2, 2], 1.0),
            (100, 7, [3, 5], 0.0),
        ] {
            let img = texture(w, h);
            let p = ClaheParams {
                clip_limit: clip,
                tile_grid: tiles,
            };
            assert_eq!(
                clahe_rgb(&img, &p),
                reference(&img, &p),
                "{w}x{h} {tiles:?} {clip}"
            );
        }
    }

    #[test]
    fn geometry_follows_opencv() {
        let g = Grid::new(2560, 1920, [8, 8]);
        assert_eq!((g.tile_w, g.tile_h), (320, 240));
        let g = Grid::new(2501, 1877, [8, 8]);
        assert_eq!((g.tile_w, g.tile_h), (313, 235)); // 2504 / 8, 1880 / 8
        let g = Grid::new(2560, 1877, [8, 8]);
        assert_eq!((g.tile_w, g.tile_h), (321, 235)); // 2560 + 8: a whole extra column
        assert_eq!(clip_pixels(40.0, 320 * 240), 12000);
        assert_eq!(clip_pixels(0.001, 64), 1);
        assert_eq!(clip_pixels(-1.0, 64), 0);
        assert_eq!(
            (0..6).map(|p| reflect101(p, 4)).collect::<Vec<_>>(),
            [0, 1, 2, 3, 2, 1]
        );
    }

    #[test]
    fn channels_are_independent() {
        let img = texture(50, 40);
        let out = clahe_rgb(&img, &ClaheParams::default());
        let swapped = RgbImage::from_fn(50, 40, |x, y| {
            let p = img.get_pixel(x, y);
            Rgb([p[2], p[0], p[1]])
        });
        let out_swapped = clahe_rgb(&swapped, &ClaheParams::default());
        for (a, b) in out.pixels().zip(out_swapped.pixels()) {
            assert_eq!([a[2], a[0], a[1]], b.0);
        }
    }
}
