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
/// Samples per gather/compute block of the interpolation.
const BLOCK: usize = 192;

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
        let mut hist = [[0u32; BINS]; 3];
        for py in ty * g.tile_h..(ty + 1) * g.tile_h {
            let sy = reflect101(py, g.height);
            let row = &src[sy * stride..(sy + 1) * stride];
            let inside = x1.min(g.width);
            if x0 < inside {
                count_rgb(&row[3 * x0..3 * inside], &mut hist);
            }
            for px in x0.max(g.width)..x1 {
                let sx = reflect101(px, g.width);
                for (c, hc) in hist.iter_mut().enumerate() {
                    hc[usize::from(row[3 * sx + c])] += 1;
                }
            }
        }
        for (hc, out) in hist.iter_mut().zip(lut.chunks_exact_mut(BINS)) {
            equalise(hc, clip, scale, out);
        }
    }
    luts
}

/// Adds interleaved RGB samples to the three channel histograms.
fn count_rgb(rgb: &[u8], hist: &mut [[u32; BINS]; 3]) {
    let [r, g, b] = hist;
    for px in rgb.chunks_exact(3) {
        r[usize::from(px[0])] += 1;
        g[usize::from(px[1])] += 1;
        b[usize::from(px[2])] += 1;
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
        let mut residual = clipped as usize - batch as usize * BINS;
        for h in hist.iter_mut() {
            *h += batch;
        }
        // The remainder goes one pixel per bin, spread at a fixed step from bin 0.
        if residual != 0 {
            let step = (BINS / residual).max(1);
            let mut i = 0;
            while i < BINS && residual > 0 {
                hist[i] += 1;
                i += step;
                residual -= 1;
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

/// Per-sample column data that every row reuses: the segment's offset into the band table
/// plus the channel's, and the two horizontal weights.
struct Columns {
    offset: Vec<u32>,
    w_left: Vec<f32>,
    w_right: Vec<f32>,
}

impl Columns {
    fn new(g: &Grid) -> Self {
        let n = 3 * g.width;
        let mut cols = Self {
            offset: Vec::with_capacity(n),
            w_left: Vec::with_capacity(n),
            w_right: Vec::with_capacity(n),
        };
        let inv_tw = 1.0f32 / g.tile_w as f32;
        for x in 0..g.width {
            let (tx, xa) = tile_coord(x, inv_tw);
            let segment = (tx + 1) as u32; // 0..=tiles_x
            for c in 0..3u32 {
                cols.offset.push(segment * TILE_LUT as u32 + c * BINS as u32);
                cols.w_left.push(1.0 - xa);
                cols.w_right.push(xa);
            }
        }
        cols
    }
}

/// For the rows between two tile-centre rows ("band" `band` = upper tile row + 1), packs the
/// four neighbouring LUT values of every column segment, channel and grey level into one
/// `u32` (top-left, top-right, bottom-left, bottom-right from the low byte up), so the
/// per-pixel work needs a single lookup instead of four.
fn fill_band(luts: &[u8], g: &Grid, band: usize, table: &mut [u32]) {
    let ty1 = band.saturating_sub(1);
    let ty2 = band.min(g.tiles_y - 1);
    for (segment, seg_table) in table.chunks_exact_mut(TILE_LUT).enumerate() {
        let tx1 = segment.saturating_sub(1);
        let tx2 = segment.min(g.tiles_x - 1);
        let lut = |ty: usize, tx: usize| &luts[(ty * g.tiles_x + tx) * TILE_LUT..][..TILE_LUT];
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
    let mut table = vec![0u32; (g.tiles_x + 1) * TILE_LUT];
    let mut current_band = usize::MAX;
    let mut packed = [0u32; BLOCK];
    for (y, (srow, orow)) in src.chunks_exact(n).zip(out.chunks_exact_mut(n)).enumerate() {
        let (ty, ya) = tile_coord(y, inv_th);
        let band = (ty + 1) as usize;
        if band != current_band {
            fill_band(luts, g, band, &mut table);
            current_band = band;
        }
        for start in (0..n).step_by(BLOCK) {
            let end = (start + BLOCK).min(n);
            let packed = &mut packed[..end - start];
            for ((p, &off), &v) in packed.iter_mut().zip(&cols.offset[start..end]).zip(&srow[start..end]) {
                *p = table[off as usize + usize::from(v)];
            }
            blend(
                packed,
                &cols.w_left[start..end],
                &cols.w_right[start..end],
                ya,
                &mut orow[start..end],
            );
        }
    }
}

/// The arithmetic of OpenCV's interpolation, in its order and in `f32`, then `cvRound`.
/// Kept free of lookups so that it vectorises.
#[inline]
fn blend(packed: &[u32], w_left: &[f32], w_right: &[f32], ya: f32, out: &mut [u8]) {
    // Adding 2^23 rounds a value in [0, 2^23) to an integer, half to even, and leaves that
    // integer in the low mantissa bits.
    const MAGIC: f32 = 8_388_608.0;
    const MAGIC_BITS: u32 = 0x4B00_0000;
    let ya1 = 1.0 - ya;
    let n = packed.len().min(w_left.len()).min(w_right.len()).min(out.len());
    for i in 0..n {
        let p = packed[i];
        let byte = |shift: u32| ((p >> shift) & 0xFF) as i32 as f32;
        let (xa1, xa) = (w_left[i], w_right[i]);
        let res = (byte(0) * xa1 + byte(8) * xa) * ya1 + (byte(16) * xa1 + byte(24) * xa) * ya;
        let rounded = (res + MAGIC).to_bits().wrapping_sub(MAGIC_BITS);
        out[i] = rounded.min(255) as u8;
    }
}

#[cfg(test)]
mod tests;
