//! The renderer: one synthetic H&E field of cervical squamous epithelium over stroma.
//!
//! The picture is painted as two stain concentration fields (haematoxylin and eosin) and
//! turned into RGB with the Beer-Lambert law at the end, so that stain jitter, hue shift
//! and overlapping structures behave like real stain does. Every length is given in pixels
//! of a 2560x1920 frame (roughly a 20x field) and scaled with the requested size, so a
//! small render looks like a downscaled big one.
//!
//! Passes over the whole frame: one tissue pass (lumen, stroma texture, epithelial
//! cytoplasm and cell borders), a separable 5-tap blur of the two fields, and the
//! colour conversion. Nuclei, vessels and the cell tessellation are splatted per object.
//! The full-frame passes run row-parallel on rayon; every random number comes from the
//! seed (a ChaCha8 stream for the scene, a per-row SplitMix stream for pixel noise), so
//! the result does not depend on the number of threads.

use image::{GrayImage, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::Grade;

/// Area of the reference frame; lengths below are pixels at this size.
const REF_AREA: f32 = 2560.0 * 1920.0;

/// One rendered image with its ground-truth masks (same size and orientation).
pub(crate) struct Rendered {
    pub image: RgbImage,
    /// 255 inside the squamous epithelium.
    pub epithelium: GrayImage,
    /// 255 inside the atypical (dysplastic) part of the epithelium; empty for Non-neoplasm.
    pub lesion: GrayImage,
}

// ---------------------------------------------------------------------------------------
// small numeric helpers

#[inline]
fn smooth01(t: f32) -> f32 {
    let t = t.clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

#[inline]
fn smoothstep(a: f32, b: f32, x: f32) -> f32 {
    let t = ((x - a) / (b - a)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

#[inline]
fn lerp(a: f32, b: f32, t: f32) -> f32 {
    a + (b - a) * t
}

/// Piecewise-linear lookup in a table of (x, y) sorted by x.
fn pl(table: &[(f32, f32)], x: f32) -> f32 {
    if x <= table[0].0 {
        return table[0].1;
    }
    for win in table.windows(2) {
        let (x0, y0) = win[0];
        let (x1, y1) = win[1];
        if x <= x1 {
            return lerp(y0, y1, (x - x0) / (x1 - x0));
        }
    }
    table[table.len() - 1].1
}

#[inline]
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Tileable 2-D value noise on a 256x256 lattice of random values, smooth interpolation.
struct Noise {
    /// Lattice values in 1/255 steps: a byte table stays in cache.
    t: Box<[u8; NS * NS]>,
}

const NS: usize = 256;

impl Noise {
    fn new(rng: &mut ChaCha8Rng) -> Self {
        let v: Vec<u8> = (0..NS * NS).map(|_| rng.random::<u8>()).collect();
        Noise {
            t: v.into_boxed_slice().try_into().expect("NS * NS values"),
        }
    }

    #[inline(always)]
    fn at(&self, x: f32, y: f32) -> f32 {
        // floor without a libm call (baseline x86-64 has no rounding instruction)
        let xi = x as i32;
        let xi = xi - ((xi as f32) > x) as i32;
        let yi = y as i32;
        let yi = yi - ((yi as f32) > y) as i32;
        let fx = x - xi as f32;
        let fy = y - yi as f32;
        let sx = fx * fx * (3.0 - 2.0 * fx);
        let sy = fy * fy * (3.0 - 2.0 * fy);
        // masked indices: wrap-around tiling, and no bounds checks
        let (x0, x1) = (xi as usize & (NS - 1), (xi + 1) as usize & (NS - 1));
        let (r0, r1) = (
            (yi as usize & (NS - 1)) * NS,
            ((yi + 1) as usize & (NS - 1)) * NS,
        );
        let t = &*self.t;
        let a = t[(r0 | x0) & (NS * NS - 1)] as f32;
        let b = t[(r0 | x1) & (NS * NS - 1)] as f32;
        let c = t[(r1 | x0) & (NS * NS - 1)] as f32;
        let d = t[(r1 | x1) & (NS * NS - 1)] as f32;
        lerp(lerp(a, b, sx), lerp(c, d, sx), sy) * (1.0 / 255.0)
    }
}

/// Haematoxylin and eosin concentration fields.
struct Canvas {
    w: usize,
    h: usize,
    hem: Vec<f32>,
    eos: Vec<f32>,
}

// ---------------------------------------------------------------------------------------
// scene description

/// One epithelial cell: the tessellation ellipse (its half-width ax and half-height ay)
/// and how its cytoplasm is stained.
struct Cell {
    x: f32,
    y: f32,
    ax: f32,
    ay: f32,
    cyto_h: f32,
    cyto_e: f32,
    /// Visibility of the cell border, 0..1.
    border: f32,
    /// Normalised radius of a clear perinuclear halo (koilocyte, mitosis); 0 for none.
    halo: f32,
    /// How clear the halo is, 0..1.
    halo_k: f32,
}

/// A stained ellipse with an optional irregular outline and chromatin texture.
#[derive(Clone, Copy)]
struct Blob {
    x: f32,
    y: f32,
    rx: f32,
    ry: f32,
    /// Orientation of the rx axis.
    angle: f32,
    /// Amplitude of the 3rd-harmonic outline wobble (pleomorphism).
    irr: f32,
    /// Phase of the wobble.
    phase: f32,
    /// Haematoxylin and eosin inside.
    h: f32,
    e: f32,
    /// Chromatin texture amplitude (0 smooth, 1 very coarse).
    chrom: f32,
    /// Extra darkness of the nuclear rim.
    rim: f32,
}

/// The epithelial band: per canvas column, the surface and basement membrane heights
/// and the relative extent of atypia (fraction of the thickness from the membrane up).
struct Band {
    ys: Vec<f32>,
    yb: Vec<f32>,
    ext: Vec<f32>,
}

impl Band {
    #[inline]
    fn col(&self, x: f32) -> usize {
        (x.max(0.0) as usize).min(self.ys.len() - 1)
    }
}

/// Sum of sines: amplitude, angular frequency (rad / px), phase.
struct Wave(Vec<(f32, f32, f32)>);

impl Wave {
    fn eval(&self, x: f32) -> f32 {
        self.0.iter().map(|&(a, f, p)| a * (f * x + p).sin()).sum()
    }
    fn random(rng: &mut ChaCha8Rng, comps: &[(f32, f32, f32, f32)]) -> Wave {
        // (amp_lo, amp_hi, wavelength_lo, wavelength_hi)
        Wave(
            comps
                .iter()
                .map(|&(a0, a1, l0, l1)| {
                    let a = rng.random_range(a0..=a1);
                    let l = rng.random_range(l0..=l1).max(1e-3);
                    let p = rng.random_range(0.0..std::f32::consts::TAU);
                    (a, std::f32::consts::TAU / l, p)
                })
                .collect(),
        )
    }
}

// Normal maturation by maturity m (0 basal .. 1 superficial), lengths at reference scale.
const CELL_W: &[(f32, f32)] = &[
    (0.0, 13.0),
    (0.12, 19.0),
    (0.4, 44.0),
    (0.7, 58.0),
    (1.0, 74.0),
];
const CELL_H: &[(f32, f32)] = &[
    (0.0, 17.0),
    (0.12, 20.0),
    (0.4, 33.0),
    (0.7, 25.0),
    (1.0, 12.0),
];
const NUC_RX: &[(f32, f32)] = &[(0.0, 4.6), (0.12, 6.0), (0.4, 6.0), (0.7, 6.0), (1.0, 7.2)];
const NUC_RY: &[(f32, f32)] = &[(0.0, 7.2), (0.12, 6.0), (0.4, 5.2), (0.7, 3.6), (1.0, 2.0)];
const NUC_H: &[(f32, f32)] = &[(0.0, 1.2), (0.4, 0.9), (0.7, 1.1), (1.0, 1.5)];
const CYTO_H: &[(f32, f32)] = &[(0.0, 0.15), (0.12, 0.11), (0.4, 0.035), (1.0, 0.03)];
const CYTO_E: &[(f32, f32)] = &[
    (0.0, 0.27),
    (0.12, 0.25),
    (0.4, 0.11),
    (0.7, 0.17),
    (1.0, 0.38),
];
const BORDER: &[(f32, f32)] = &[(0.0, 0.15), (0.12, 0.35), (0.4, 1.0), (1.0, 0.8)];
/// Relative depth v -> maturity for a normal epithelium: a thin basal/parabasal zone.
const MATURITY: &[(f32, f32)] = &[(0.0, 0.0), (0.06, 0.12), (1.0, 1.0)];

/// Grade-specific parameters.
struct Atypia {
    /// Mean relative extent of the atypical zone (0 none, 1 full thickness).
    extent: f32,
    /// Severity 0..1: nuclear size, darkness, pleomorphism.
    sev: f32,
    /// Fraction of atypical cells in mitosis.
    mitoses: f32,
    /// Fraction of maturing cells above the lesion that are koilocytes.
    koilocytes: f32,
}

fn atypia(grade: Grade, rng: &mut ChaCha8Rng) -> Atypia {
    match grade {
        Grade::NonNeoplasm => Atypia {
            extent: 0.0,
            sev: 0.0,
            mitoses: 0.0,
            koilocytes: 0.0,
        },
        Grade::Cin1 => Atypia {
            extent: rng.random_range(0.24..0.34),
            sev: rng.random_range(0.55..0.75),
            mitoses: 0.005,
            koilocytes: rng.random_range(0.08..0.2),
        },
        Grade::Cin2 => Atypia {
            extent: rng.random_range(0.52..0.66),
            sev: rng.random_range(0.75..0.9),
            mitoses: 0.01,
            koilocytes: rng.random_range(0.02..0.08),
        },
        Grade::Cin3 => Atypia {
            extent: rng.random_range(0.9..1.02),
            sev: rng.random_range(0.9..1.0),
            mitoses: 0.018,
            koilocytes: 0.0,
        },
    }
}

// ---------------------------------------------------------------------------------------
// splatting

/// Calls `f(index, alpha, t)` for every pixel covered by the blob, where alpha is the
/// anti-aliased coverage and t the normalised radius (0 centre, 1 outline).
fn for_blob(cw: usize, chh: usize, b: &Blob, mut f: impl FnMut(usize, usize, usize, f32, f32)) {
    // Sub-pixel blobs are drawn at least ~0.8 px wide with proportionally less ink.
    let rx = b.rx.max(0.8);
    let ry = b.ry.max(0.8);
    let ink = ((b.rx * b.ry) / (rx * ry)).min(1.0);
    let reach = rx.max(ry) * (1.0 + b.irr) + 1.5;
    let x0 = (b.x - reach).floor().max(0.0) as usize;
    let y0 = (b.y - reach).floor().max(0.0) as usize;
    let x1 = ((b.x + reach).ceil() as isize).min(cw as isize - 1);
    let y1 = ((b.y + reach).ceil() as isize).min(chh as isize - 1);
    if x1 < 0 || y1 < 0 || x0 as isize > x1 || y0 as isize > y1 {
        return;
    }
    let (sn, cs) = b.angle.sin_cos();
    let (sp, cp) = b.phase.sin_cos();
    let irx2 = 1.0 / (rx * rx);
    let iry2 = 1.0 / (ry * ry);
    let qmax = {
        let m = 1.0 + b.irr + 1.5 / rx.min(ry);
        m * m
    };
    for py in y0..=y1 as usize {
        let dy = py as f32 + 0.5 - b.y;
        for px in x0..=x1 as usize {
            let dx = px as f32 + 0.5 - b.x;
            let u = dx * cs + dy * sn;
            let w = -dx * sn + dy * cs;
            let q = u * u * irx2 + w * w * iry2;
            if q > qmax {
                continue;
            }
            let rn = q.sqrt();
            let rho = if b.irr > 0.0 {
                let rr = (u * u + w * w).sqrt() + 1e-6;
                let c = (u * cp + w * sp) / rr;
                1.0 + b.irr * (4.0 * c * c * c - 3.0 * c)
            } else {
                1.0
            };
            let alpha = if rn < 1e-3 {
                1.0
            } else {
                let g = (u * u * irx2 * irx2 + w * w * iry2 * iry2).sqrt() / rn;
                (0.5 - (rn - rho) / g).clamp(0.0, 1.0)
            };
            if alpha <= 0.0 {
                continue;
            }
            f(py * cw + px, px, py, alpha * ink, rn / rho);
        }
    }
}

/// Paints a nucleus: haematoxylin-rich with chromatin texture and a darker rim.
fn paint_nucleus(cv: &mut Canvas, noise: &Noise, s: f32, b: &Blob) {
    let inv = 1.0 / (2.2 * s).max(0.35);
    let (w, h) = (cv.w, cv.h);
    let off = (b.x * 0.37).fract() * 97.0 + (b.y * 0.11).fract() * 31.0;
    for_blob(w, h, b, |i, px, py, a, t| {
        let n = noise.at(px as f32 * inv + off, py as f32 * inv + 0.7 * off);
        let tex = 1.0 + b.chrom * (n - 0.5) * 1.6;
        let hv = b.h * tex * (1.0 + b.rim * smooth01((t - 0.65) * (1.0 / 0.35)));
        let cur = cv.hem[i];
        cv.hem[i] = cur + a * (hv.max(cur) - cur);
        cv.eos[i] += a * (b.e - cv.eos[i]);
    });
}

/// Paints a flat blob that replaces the stain with (h, e) scaled by `shade(t)`.
fn paint_fill(cv: &mut Canvas, b: &Blob, shade: impl Fn(f32) -> f32) {
    let (w, h) = (cv.w, cv.h);
    for_blob(w, h, b, |i, _, _, a, t| {
        let k = shade(t);
        cv.hem[i] += a * (b.h * k - cv.hem[i]);
        cv.eos[i] += a * (b.e * k - cv.eos[i]);
    });
}

/// Nearest and second-nearest cell (in each cell's own normalised metric) per pixel of
/// the rows spanned by the epithelium.
struct Tessellation {
    y0: usize,
    rows: usize,
    w: usize,
    q1: Vec<f32>,
    q2: Vec<f32>,
    id: Vec<u32>,
}

impl Tessellation {
    fn build(w: usize, y0: usize, y1: usize, band: &Band, cells: &[Cell]) -> Self {
        let rows = y1.saturating_sub(y0);
        let n = w * rows;
        let mut t = Tessellation {
            y0,
            rows,
            w,
            q1: vec![f32::INFINITY; n],
            q2: vec![f32::INFINITY; n],
            id: vec![u32::MAX; n],
        };
        const R: f32 = 1.6;
        for (ci, c) in cells.iter().enumerate() {
            let xa = (c.x - R * c.ax).floor().max(0.0) as isize;
            let xb = ((c.x + R * c.ax).ceil() as isize).min(w as isize - 1);
            let ya = ((c.y - R * c.ay).floor() as isize).max(y0 as isize);
            let yb = ((c.y + R * c.ay).ceil() as isize).min((y0 + rows) as isize - 1);
            if xa > xb || ya > yb {
                continue;
            }
            let iax = 1.0 / c.ax;
            let iay = 1.0 / c.ay;
            for py in ya as usize..=yb as usize {
                let dy = (py as f32 + 0.5 - c.y) * iay;
                let dy2 = dy * dy;
                if dy2 > R * R {
                    continue;
                }
                let row = (py - y0) * w;
                for px in xa as usize..=xb as usize {
                    let fy = py as f32;
                    if fy < band.ys[px] - 1.0 || fy > band.yb[px] + 1.0 {
                        continue;
                    }
                    let dx = (px as f32 + 0.5 - c.x) * iax;
                    let q = dx * dx + dy2;
                    let i = row + px;
                    if q < t.q1[i] {
                        t.q2[i] = t.q1[i];
                        t.q1[i] = q;
                        t.id[i] = ci as u32;
                    } else if q < t.q2[i] {
                        t.q2[i] = q;
                    }
                }
            }
        }
        t
    }

    #[inline]
    fn get(&self, x: usize, y: usize) -> Option<(u32, f32, f32)> {
        if y < self.y0 || y >= self.y0 + self.rows {
            return None;
        }
        let i = (y - self.y0) * self.w + x;
        let id = self.id[i];
        if id == u32::MAX {
            None
        } else {
            Some((id, self.q1[i], self.q2[i]))
        }
    }
}

// ---------------------------------------------------------------------------------------
// the renderer

#[allow(clippy::too_many_lines)]
pub(crate) fn render_full(
    grade: Grade,
    width: u32,
    height: u32,
    seed: u64,
    masks: bool,
) -> Rendered {
    let width = width.max(1);
    let height = height.max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);

    // Orientation: the canonical canvas has lumen at the top and stroma at the bottom; the
    // result is any of the 8 flips/transposes of it.
    let transpose = rng.random_bool(0.25);
    let flip_x = rng.random_bool(0.5);
    let flip_y = rng.random_bool(0.4);
    let (cw, ch) = if transpose {
        (height as usize, width as usize)
    } else {
        (width as usize, height as usize)
    };
    let orient = Orient {
        transpose,
        flip_x,
        flip_y,
        cw,
        ch,
    };
    let (cwf, chf) = (cw as f32, ch as f32);

    // Magnification: lengths are reference pixels times s.
    let s = ((cwf * chf / REF_AREA).sqrt() * rng.random_range(0.85..1.15)).max(0.02);
    let noise = Noise::new(&mut rng);
    let aty = atypia(grade, &mut rng);

    // ---- geometry of the epithelial band
    let t_mean = (s * rng.random_range(550.0..950.0)).min(0.66 * chf);
    let mut ys0 = chf * rng.random_range(0.05..0.28);
    let over = ys0 + t_mean - 0.86 * chf;
    if over > 0.0 {
        ys0 -= over;
    }
    let yb0 = ys0 + t_mean;
    let tilt = rng.random_range(-0.06f32..0.06);
    // large-scale course of the band (shared by surface and membrane)
    let course = Wave::random(
        &mut rng,
        &[(0.03 * t_mean, 0.09 * t_mean, 0.7 * cwf, 1.6 * cwf)],
    );
    // rete pegs: rounded downward bulges of the membrane with narrow papillae between
    let pegs = Wave::random(&mut rng, &[(1.0, 1.0, 2.0 * 220.0 * s, 2.0 * 420.0 * s)]);
    let peg_amp = s * rng.random_range(10.0..45.0);
    let peg_mod = Wave::random(&mut rng, &[(0.2, 0.45, 600.0 * s, 1400.0 * s)]);
    let bm_fine = Wave::random(&mut rng, &[(2.0 * s, 7.0 * s, 70.0 * s, 150.0 * s)]);
    let thick = Wave::random(
        &mut rng,
        &[
            (0.03, 0.1, 0.5 * cwf, 1.4 * cwf),
            (0.01, 0.04, 300.0 * s, 700.0 * s),
        ],
    );
    let rough = Wave::random(
        &mut rng,
        &[
            (0.5 * s, 2.0 * s, 40.0 * s, 90.0 * s),
            (2.0 * s, 9.0 * s, 180.0 * s, 420.0 * s),
        ],
    );
    let ext_wave = Wave::random(&mut rng, &[(0.03, 0.07, 0.4 * cwf, 1.2 * cwf)]);
    let mut band = Band {
        ys: Vec::with_capacity(cw),
        yb: Vec::with_capacity(cw),
        ext: Vec::with_capacity(cw),
    };
    for x in 0..cw {
        let xf = x as f32 + 0.5;
        let base = yb0 + tilt * (xf - 0.5 * cwf) + course.eval(xf);
        let peg = peg_amp * (1.0 + peg_mod.eval(xf)) * (pegs.eval(xf).abs().powf(1.3) - 0.5);
        let yb = base + peg + bm_fine.eval(xf);
        let t = t_mean * (1.0 + thick.eval(xf));
        band.yb.push(yb);
        band.ys.push(base - t + rough.eval(xf));
        let e = if aty.extent > 0.0 {
            (aty.extent + ext_wave.eval(xf)).clamp(0.0, 1.0)
        } else {
            0.0
        };
        band.ext.push(e);
    }

    // ---- epithelial cells, row by row from the basement membrane up
    let mut cells: Vec<Cell> = Vec::new();
    let mut nuclei: Vec<Blob> = Vec::new();
    let sev = aty.sev;
    let atyp_r = s * rng.random_range(8.5..10.5) * (0.8 + 0.3 * sev);
    let atyp_spread = 0.15 + 0.3 * sev;
    let atyp_cell = 3.0;
    let mut v = 0.0f32;
    while v < 1.0 {
        let row_atyp = v < aty.extent;
        let h_row = if row_atyp {
            atyp_r * atyp_cell * 0.95
        } else {
            s * pl(CELL_H, maturity(v, aty.extent))
        };
        let vc = v + 0.5 * h_row / t_mean;
        let mut x = -rng.random_range(0.0..1.0) * 40.0 * s;
        while x < cwf + 40.0 * s {
            let col = band.col(x);
            let yb = band.yb[col];
            let t_loc = yb - band.ys[col];
            let e = band.ext[col];
            let slope = {
                let a = band.yb[col.saturating_sub(2)];
                let b = band.yb[(col + 2).min(cw - 1)];
                (b - a) / 4.0
            };
            let tangent = slope.atan();
            if vc < e {
                // atypical cell: large, dark, pleomorphic nucleus, scant cytoplasm
                let r = atyp_r * rng.random_range(1.0 - atyp_spread..1.0 + atyp_spread);
                let size = r * atyp_cell * rng.random_range(0.9..1.1);
                let step = size * rng.random_range(0.8..1.15);
                let y = yb - vc * t_loc + rng.random_range(-0.35..0.35) * h_row;
                let cx = x + rng.random_range(-0.15..0.15) * size;
                let mitosis = rng.random_bool(aty.mitoses as f64);
                cells.push(Cell {
                    x: cx,
                    y,
                    ax: 0.55 * size,
                    ay: 0.55 * size * rng.random_range(0.85..1.1),
                    cyto_h: 0.17 * rng.random_range(0.85..1.15),
                    cyto_e: 0.25 * rng.random_range(0.85..1.15),
                    border: 0.3,
                    halo: if mitosis { 0.7 } else { 0.0 },
                    halo_k: 0.4,
                });
                let aspect = rng.random_range(0.55 + 0.15 * (1.0 - sev)..1.0);
                let angle = rng.random_range(0.0..std::f32::consts::PI);
                if mitosis {
                    // metaphase plate: a dark irregular bar
                    nuclei.push(Blob {
                        x: cx,
                        y,
                        rx: r * 0.95,
                        ry: r * 0.35,
                        angle,
                        irr: 0.25,
                        phase: rng.random_range(0.0..6.3),
                        h: 2.6,
                        e: 0.1,
                        chrom: 0.7,
                        rim: 0.0,
                    });
                } else {
                    nuclei.push(Blob {
                        x: cx + rng.random_range(-0.1..0.1) * r,
                        y: y + rng.random_range(-0.1..0.1) * r,
                        rx: r,
                        ry: r * aspect,
                        angle,
                        irr: rng.random_range(0.01..0.03 + 0.05 * sev),
                        phase: rng.random_range(0.0..6.3),
                        h: rng.random_range(1.25..1.75) * (0.9 + 0.15 * sev),
                        e: 0.12,
                        chrom: 0.25 + 0.35 * sev,
                        rim: 0.25,
                    });
                }
                x += step;
            } else {
                let m = (maturity(vc, e) + rng.random_range(-0.03..0.03)).clamp(0.0, 1.0);
                let cwid = s * pl(CELL_W, m) * rng.random_range(0.85..1.15);
                let chgt = s * pl(CELL_H, m) * rng.random_range(0.85..1.15);
                let step = cwid * rng.random_range(0.9..1.1);
                // rows were spaced for the mean extent; thin out where cells are taller
                if chgt > h_row * 1.15 && !rng.random_bool((h_row / chgt) as f64) {
                    x += step;
                    continue;
                }
                let y = yb - vc * t_loc + rng.random_range(-0.2..0.2) * chgt;
                let cx = x + rng.random_range(-0.1..0.1) * cwid;
                let koilo =
                    m > 0.4 && aty.koilocytes > 0.0 && rng.random_bool(aty.koilocytes as f64);
                cells.push(Cell {
                    x: cx,
                    y,
                    ax: 0.55 * cwid,
                    ay: 0.55 * chgt,
                    cyto_h: pl(CYTO_H, m) * rng.random_range(0.85..1.15),
                    cyto_e: pl(CYTO_E, m)
                        * rng.random_range(0.85..1.15)
                        * if koilo { 1.35 } else { 1.0 },
                    border: pl(BORDER, m),
                    halo: if koilo {
                        rng.random_range(0.45..0.65)
                    } else {
                        0.0
                    },
                    halo_k: 0.75,
                });
                // the nucleus must lie inside the epithelium
                if y < band.ys[band.col(cx)] + 1.0 {
                    x += step;
                    continue;
                }
                let jitter = 0.12 + 0.25 * smoothstep(0.1, 0.4, m) - 0.25 * smoothstep(0.7, 1.0, m);
                let nsz = rng.random_range(0.82..1.18);
                let mut nuc = Blob {
                    x: if koilo {
                        cx
                    } else {
                        cx + rng.random_range(-0.08..0.08) * cwid
                    },
                    y,
                    rx: s * pl(NUC_RX, m) * nsz * rng.random_range(0.9..1.1),
                    ry: s * pl(NUC_RY, m) * nsz * rng.random_range(0.9..1.1),
                    angle: tangent + rng.random_range(-jitter..jitter.max(1e-3)),
                    irr: rng.random_range(0.0..0.05),
                    phase: rng.random_range(0.0..6.3),
                    h: pl(NUC_H, m) * rng.random_range(0.88..1.12),
                    e: 0.1,
                    chrom: 0.3,
                    rim: 0.2,
                };
                if koilo {
                    // raisinoid, enlarged, hyperchromatic nucleus; some binucleate
                    nuc.rx = nuc.rx.max(s * 5.0) * 1.45;
                    nuc.ry = nuc.ry.max(s * 3.5) * 1.45;
                    nuc.irr = 0.1;
                    nuc.h = 1.6;
                    nuc.chrom = 0.4;
                    if rng.random_bool(0.1) {
                        let mut b2 = nuc;
                        let d = nuc.rx * 1.1;
                        nuc.x -= d;
                        b2.x += d;
                        b2.phase += 1.3;
                        nuclei.push(b2);
                    }
                }
                nuclei.push(nuc);
                x += step;
            }
        }
        v += h_row / t_mean;
    }

    // ---- stroma objects
    let stroma_area: f32 = band.yb.iter().map(|&y| (chf - y).max(0.0)).sum();
    let fibre_angle = rng.random_range(-0.3f32..0.3);
    let mut stroma_blobs: Vec<Blob> = Vec::new();
    let sample_stroma = |rng: &mut ChaCha8Rng, min_depth: f32| -> Option<(f32, f32, f32)> {
        let x = rng.random_range(0.0..cwf);
        let yb = band.yb[band.col(x)];
        let top = (yb + min_depth).max(0.0);
        if top >= chf {
            return None;
        }
        Some((x, rng.random_range(top..chf), yb))
    };
    let n_fib = (stroma_area / (s * s * rng.random_range(5500.0..11000.0))) as usize;
    for _ in 0..n_fib {
        if let Some((x, y, _)) = sample_stroma(&mut rng, 3.0 * s) {
            stroma_blobs.push(Blob {
                x,
                y,
                rx: s * rng.random_range(9.0..17.0),
                ry: s * rng.random_range(1.6..3.0),
                angle: fibre_angle + rng.random_range(-0.35..0.35),
                irr: 0.04,
                phase: rng.random_range(0.0..6.3),
                h: rng.random_range(1.2..1.6),
                e: 0.15,
                chrom: 0.15,
                rim: 0.1,
            });
        }
    }
    let n_lym = (stroma_area / (s * s * rng.random_range(9000.0..40000.0))) as usize;
    for _ in 0..n_lym {
        if let Some((x, y, _)) = sample_stroma(&mut rng, 2.0 * s) {
            let r = s * rng.random_range(3.6..4.6);
            stroma_blobs.push(Blob {
                x,
                y,
                rx: r,
                ry: r * rng.random_range(0.85..1.0),
                angle: rng.random_range(0.0..3.2),
                irr: 0.03,
                phase: 0.0,
                h: rng.random_range(1.8..2.2),
                e: 0.1,
                chrom: 0.1,
                rim: 0.0,
            });
        }
    }
    // capillaries near the membrane: lumen, wall, red cells, endothelial nuclei
    struct Vessel {
        lumen: Blob,
        wall: Blob,
        rbcs: Vec<Blob>,
        endo: Vec<Blob>,
    }
    let mut vessels = Vec::new();
    let n_ves = (cwf / (s * rng.random_range(220.0..480.0))).round() as usize;
    for _ in 0..n_ves {
        let x = rng.random_range(0.0..cwf);
        let yb = band.yb[band.col(x)];
        let a = s * rng.random_range(18.0..60.0);
        // keep clear of the membrane (it undulates, so look at the deepest point nearby)
        let x0 = band.col(x - a - 5.0 * s);
        let x1 = band.col(x + a + 5.0 * s);
        let yb = band.yb[x0..=x1].iter().fold(yb, |m, &v| m.max(v));
        let y = yb + a + s * rng.random_range(12.0..350.0);
        let b = a * rng.random_range(0.4..1.0);
        if y - a > chf {
            continue;
        }
        let angle = fibre_angle + rng.random_range(-0.4..0.4);
        let lumen = Blob {
            x,
            y,
            rx: a,
            ry: b,
            angle,
            irr: 0.05,
            phase: rng.random_range(0.0..6.3),
            h: 0.02,
            e: 0.12,
            chrom: 0.0,
            rim: 0.0,
        };
        let wall_w = s * rng.random_range(2.5..5.0);
        let wall = Blob {
            rx: a + wall_w,
            ry: b + wall_w,
            h: 0.06,
            e: 0.75,
            ..lumen
        };
        let fill = rng.random_range(0.2..0.9);
        let rr = s * 3.4;
        let n_rbc = (fill * a * b / (rr * rr)) as usize;
        let (sn, cs) = angle.sin_cos();
        let rbcs = (0..n_rbc)
            .map(|_| {
                let ang = rng.random_range(0.0..std::f32::consts::TAU);
                let rad = rng.random::<f32>().sqrt() * 0.85;
                let u = rad * ang.cos() * (a - rr).max(0.0);
                let w = rad * ang.sin() * (b - rr).max(0.0);
                Blob {
                    x: x + u * cs - w * sn,
                    y: y + u * sn + w * cs,
                    rx: rr,
                    ry: rr * rng.random_range(0.75..1.0),
                    angle: rng.random_range(0.0..3.2),
                    irr: 0.0,
                    phase: 0.0,
                    h: 0.03,
                    e: rng.random_range(0.75..1.0),
                    chrom: 0.0,
                    rim: 0.0,
                }
            })
            .collect();
        let n_endo = rng.random_range(2..6);
        let endo = (0..n_endo)
            .map(|_| {
                let ang = rng.random_range(0.0..std::f32::consts::TAU);
                let u = (a + 0.5 * wall_w) * ang.cos();
                let w = (b + 0.5 * wall_w) * ang.sin();
                // tangent of the ellipse at that angle
                let tan = (b * ang.cos()).atan2(-a * ang.sin()) + angle;
                Blob {
                    x: x + u * cs - w * sn,
                    y: y + u * sn + w * cs,
                    rx: s * rng.random_range(7.0..11.0),
                    ry: s * rng.random_range(2.0..3.0),
                    angle: tan,
                    irr: 0.03,
                    phase: 0.0,
                    h: 1.3,
                    e: 0.15,
                    chrom: 0.15,
                    rim: 0.1,
                }
            })
            .collect();
        vessels.push(Vessel {
            lumen,
            wall,
            rbcs,
            endo,
        });
    }

    // ---- tissue pass: lumen, stroma texture, epithelial cytoplasm and cell borders
    let epi_top = band
        .ys
        .iter()
        .fold(f32::INFINITY, |a, &b| a.min(b))
        .floor()
        .max(0.0) as usize;
    let epi_bot = (band
        .yb
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b))
        .ceil() as usize
        + 2)
    .min(ch);
    let tess = Tessellation::build(cw, epi_top.min(ch), epi_bot, &band, &cells);

    let tissue = Tissue {
        cw,
        seed,
        band: &band,
        tess: &tess,
        cells: &cells,
        noise: &noise,
        stroma_e: rng.random_range(0.5..0.62),
        fibre: fibre_angle.sin_cos(),
        warp_amp: s * rng.random_range(40.0..110.0),
        inv_warp: 1.0 / (s * rng.random_range(250.0..450.0)),
        inv_fl: 1.0 / (s * rng.random_range(60.0..120.0)),
        inv_fw: 1.0 / (s * rng.random_range(3.0..5.0)),
        inv_bl: 1.0 / (s * rng.random_range(450.0..800.0)),
        inv_bw: 1.0 / (s * rng.random_range(40.0..70.0)),
        inv_cleft: 1.0 / rng.random_range(0.04f32..0.14),
        inv_loose: 1.0 / (45.0 * s),
        inv_low: 1.0 / (260.0 * s),
        lumen_h: rng.random_range(0.005..0.02),
        lumen_e: rng.random_range(0.01..0.04),
        line_w: (1.3 * s).max(0.6),
        bm_w: (2.0 * s).max(0.8),
    };
    let mut cv = Canvas {
        w: cw,
        h: ch,
        hem: vec![0.0; cw * ch],
        eos: vec![0.0; cw * ch],
    };
    cv.hem
        .par_chunks_mut(cw)
        .zip(cv.eos.par_chunks_mut(cw))
        .enumerate()
        .for_each(|(y, (hr, er))| tissue.row(y, hr, er));

    // ---- objects
    for v in &vessels {
        paint_fill(&mut cv, &v.wall, |_| 1.0);
        paint_fill(&mut cv, &v.lumen, |_| 1.0);
        for r in &v.rbcs {
            paint_fill(&mut cv, r, |t| 0.8 + 0.25 * t);
        }
        for n in &v.endo {
            paint_nucleus(&mut cv, &noise, s, n);
        }
    }
    for b in &stroma_blobs {
        paint_nucleus(&mut cv, &noise, s, b);
    }
    for n in &nuclei {
        // clip to the epithelium: the nucleus centre must be inside the band
        let c = band.col(n.x);
        if n.y < band.ys[c] || n.y > band.yb[c] {
            continue;
        }
        paint_nucleus(&mut cv, &noise, s, n);
    }

    // ---- optics: blur, stain, illumination, noise
    let bt = rng.random_range(0.55f32..1.0);
    let kernel = [
        bt / 16.0,
        4.0 * bt / 16.0,
        1.0 - 14.0 * bt / 16.0,
        4.0 * bt / 16.0,
        bt / 16.0,
    ];
    blur(&mut cv.hem, cw, ch, &kernel);
    blur(&mut cv.eos, cw, ch, &kernel);

    let hue = |rng: &mut ChaCha8Rng| rng.random_range(0.92f32..1.08);
    let h_int = rng.random_range(0.8f32..1.2);
    let e_int = rng.random_range(0.75f32..1.25);
    let hvec = [
        0.80 * hue(&mut rng) * h_int,
        0.95 * hue(&mut rng) * h_int,
        0.42 * hue(&mut rng) * h_int,
    ];
    let evec = [
        0.19 * hue(&mut rng) * e_int,
        0.85 * hue(&mut rng) * e_int,
        0.53 * hue(&mut rng) * e_int,
    ];
    let white = [
        rng.random_range(0.93f32..1.0),
        rng.random_range(0.93f32..1.0),
        rng.random_range(0.93f32..1.0),
    ];
    let bright = rng.random_range(0.94f32..1.0);
    let optics = Optics {
        orient,
        s,
        seed,
        hvec,
        evec,
        white: white.map(|w| w * bright),
        vignette: rng.random_range(0.0f32..0.12),
        uneven: rng.random_range(0.05f32..0.2),
        amp: rng.random_range(1.5f32..4.0) * 1.7 / 1023.0,
        lut: (0..LUT_LEN)
            .map(|i| 255.0 * (-(i as f32) / LUT_STEP).exp())
            .collect(),
    };
    let (ow, oh) = (width as usize, height as usize);
    let mut out = vec![0u8; ow * oh * 3];
    out.par_chunks_mut(ow * 3)
        .enumerate()
        .for_each(|(y, row)| optics.row(y, row, &cv, &noise));
    let image = RgbImage::from_raw(width, height, out).expect("buffer matches the image size");

    let (epithelium, lesion) = if masks {
        let mut epi = vec![0u8; ow * oh];
        let mut les = vec![0u8; ow * oh];
        for oy in 0..oh {
            for ox in 0..ow {
                let (x, y) = orient.canvas_of(ox, oy);
                let yf = y as f32 + 0.5;
                let (ys, yb) = (band.ys[x], band.yb[x]);
                if yf >= ys && yf < yb {
                    epi[oy * ow + ox] = 255;
                    if (yb - yf) / (yb - ys) < band.ext[x] {
                        les[oy * ow + ox] = 255;
                    }
                }
            }
        }
        (
            GrayImage::from_raw(width, height, epi).expect("mask size"),
            GrayImage::from_raw(width, height, les).expect("mask size"),
        )
    } else {
        (GrayImage::new(0, 0), GrayImage::new(0, 0))
    };
    Rendered {
        image,
        epithelium,
        lesion,
    }
}

/// How the canonical canvas (lumen up, stroma down) is turned into the output image.
#[derive(Clone, Copy)]
struct Orient {
    transpose: bool,
    flip_x: bool,
    flip_y: bool,
    cw: usize,
    ch: usize,
}

impl Orient {
    /// Canvas pixel shown at output pixel (ox, oy).
    #[inline]
    fn canvas_of(&self, ox: usize, oy: usize) -> (usize, usize) {
        let (fx, fy) = if self.transpose { (oy, ox) } else { (ox, oy) };
        (
            if self.flip_x { self.cw - 1 - fx } else { fx },
            if self.flip_y { self.ch - 1 - fy } else { fy },
        )
    }
}

/// Normal maturation level at relative depth v above an atypical zone of extent e.
#[inline]
fn maturity(v: f32, e: f32) -> f32 {
    if e <= 0.0 {
        pl(MATURITY, v)
    } else {
        0.18 + 0.82 * ((v - e) / (1.0 - e).max(1e-3)).clamp(0.0, 1.0)
    }
}

/// Everything the per-pixel tissue pass reads.
struct Tissue<'a> {
    cw: usize,
    seed: u64,
    band: &'a Band,
    tess: &'a Tessellation,
    cells: &'a [Cell],
    noise: &'a Noise,
    stroma_e: f32,
    /// (sin, cos) of the mean collagen direction.
    fibre: (f32, f32),
    warp_amp: f32,
    inv_warp: f32,
    inv_fl: f32,
    inv_fw: f32,
    inv_bl: f32,
    inv_bw: f32,
    inv_cleft: f32,
    inv_loose: f32,
    inv_low: f32,
    lumen_h: f32,
    lumen_e: f32,
    line_w: f32,
    bm_w: f32,
}

impl Tissue<'_> {
    fn row(&self, y: usize, hem: &mut [f32], eos: &mut [f32]) {
        let band = self.band;
        let noise = self.noise;
        let (fsn, fcs) = self.fibre;
        let yf = y as f32 + 0.5;
        let mut state =
            splitmix(self.seed ^ 0x7F4A_7C15 ^ (y as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
        let mut bits = 0u64;
        // slowly varying fields are sampled every 4th pixel
        let (mut wv, mut lum, mut bnd) = (0.0f32, 0.0f32, 0.5f32);
        for x in 0..self.cw {
            let xf = x as f32 + 0.5;
            let ys = band.ys[x];
            let yb = band.yb[x];
            if x % 4 == 0 {
                if yf < ys {
                    lum = smoothstep(
                        0.55,
                        0.9,
                        noise.at(xf * self.inv_low + 11.0, yf * self.inv_low + 23.0),
                    );
                } else if yf >= yb {
                    wv = noise.at(xf * self.inv_warp + 301.0, yf * self.inv_warp + 7.0) - 0.5;
                }
                // cheap white noise for the fine texture (the blur turns it into grain)
                state = splitmix(state);
                bits = state;
            }
            let fine = (bits & 0xFFFF) as f32 * (1.0 / 65536.0);
            bits >>= 16;
            let (hv, ev);
            if yf < ys {
                // lumen: near-white with faint mucus
                hv = self.lumen_h + 0.03 * lum;
                ev = self.lumen_e + 0.05 * lum;
            } else if yf < yb {
                let tex = 0.8 + 0.4 * fine;
                match self.tess.get(x, y) {
                    Some((id, q1, q2)) => {
                        let c = &self.cells[id as usize];
                        let d1 = q1.sqrt();
                        let mut h = c.cyto_h * tex;
                        let mut e = c.cyto_e * tex;
                        if c.halo > 0.0 {
                            let k = 1.0 - c.halo_k * (1.0 - smooth01((d1 - c.halo) * 10.0 + 1.0));
                            h *= k;
                            e *= k;
                        }
                        if c.border > 0.0 && q2.is_finite() {
                            let gap = (q2.sqrt() - d1) * 0.5 * c.ax.min(c.ay);
                            let b = (1.0 - gap / self.line_w).clamp(0.0, 1.0) * c.border;
                            h += 0.05 * b;
                            e += 0.22 * b;
                        }
                        hv = h;
                        ev = e;
                    }
                    None => {
                        // not reached by any cell's footprint: plain cytoplasm of this depth
                        let v = (yb - yf) / (yb - ys).max(1e-3);
                        let e = band.ext[x];
                        if v < e {
                            hv = 0.17 * tex;
                            ev = 0.25 * tex;
                        } else {
                            let m = maturity(v, e);
                            hv = pl(CYTO_H, m) * tex;
                            ev = pl(CYTO_E, m) * tex;
                        }
                    }
                }
            } else {
                let depth = yf - yb;
                // wavy collagen: fibres along a locally warped direction, grouped in
                // bundles with thin pale clefts between them
                let yy = yf + 2.0 * self.warp_amp * wv;
                let u = xf * fcs + yy * fsn + 4096.0;
                let w = -xf * fsn + yy * fcs + 4096.0;
                let f = noise.at(u * self.inv_fl + 17.0, w * self.inv_fw + 91.0);
                if x % 2 == 0 {
                    bnd = noise.at(u * self.inv_bl + 3.0, w * self.inv_bw + 5.0);
                }
                let ridge = (bnd - 0.5).abs() * 2.0;
                let bundle = 1.0 - 0.65 * (1.0 - smooth01(ridge * self.inv_cleft));
                let mut e = self.stroma_e * bundle * (0.8 + 0.4 * f) * (0.9 + 0.2 * fine);
                // looser, paler stroma just under the membrane; the membrane itself
                e *= 0.75 + 0.25 * smooth01(depth * self.inv_loose);
                if depth < self.bm_w {
                    e += 0.3;
                }
                hv = 0.025 + 0.03 * fine;
                ev = e;
            }
            hem[x] = hv;
            eos[x] = ev;
        }
    }
}

/// 255 * exp(-od) tabulated for od in [0, 8).
const LUT_STEP: f32 = 1024.0;
const LUT_LEN: usize = 8 * 1024;

/// Beer-Lambert colour conversion, illumination and sensor noise.
struct Optics {
    orient: Orient,
    s: f32,
    seed: u64,
    /// Optical density per unit stain, per RGB channel.
    hvec: [f32; 3],
    evec: [f32; 3],
    /// White balance times brightness.
    white: [f32; 3],
    vignette: f32,
    uneven: f32,
    amp: f32,
    lut: Vec<f32>,
}

impl Optics {
    /// Writes output row `oy` (RGB).
    fn row(&self, oy: usize, out: &mut [u8], cv: &Canvas, noise: &Noise) {
        let o = self.orient;
        let ow = out.len() / 3;
        if ow == 0 {
            return;
        }
        // canvas position of the row start and the canvas step per output pixel
        let (x0, y0) = o.canvas_of(0, oy);
        let (dx, dy): (isize, isize) = match (o.transpose, o.flip_x, o.flip_y) {
            (false, false, _) => (1, 0),
            (false, true, _) => (-1, 0),
            (true, _, false) => (0, 1),
            (true, _, true) => (0, -1),
        };
        let step = dy * cv.w as isize + dx;
        let i0 = (y0 * cv.w + x0) as isize;
        let (hx, hy) = (0.5 * o.cw as f32, 0.5 * o.ch as f32);
        let inv_r2 = 1.0 / (hx * hx + hy * hy);
        let inv_uneven = 1.0 / (400.0 * self.s);
        let lut_max = (self.lut.len() - 1) as f32;
        let mut state = splitmix(self.seed ^ (oy as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        let mut k = 1.0;
        for (ox, px) in out.chunks_exact_mut(3).enumerate() {
            let x = x0 as f32 + 0.5 + (ox as isize * dx) as f32;
            let y = y0 as f32 + 0.5 + (ox as isize * dy) as f32;
            let i = (i0 + ox as isize * step) as usize;
            if ox % 8 == 0 {
                // uneven section thickness / staining, a very low-frequency field
                k = 1.0
                    + self.uneven
                        * (noise.at(x * inv_uneven + 131.0, y * inv_uneven + 67.0) - 0.5)
                        * 2.0;
            }
            let hh = cv.hem[i].max(0.0) * k * LUT_STEP;
            let ee = cv.eos[i].max(0.0) * k * LUT_STEP;
            let r2 = ((x - hx) * (x - hx) + (y - hy) * (y - hy)) * inv_r2;
            let illum = 1.0 - self.vignette * r2;
            state = splitmix(state);
            let bits = state;
            for (c, v) in px.iter_mut().enumerate() {
                let li = (hh * self.hvec[c] + ee * self.evec[c]).min(lut_max) as u32 as usize;
                let nb = bits >> (20 * c);
                let n = ((nb & 1023) + ((nb >> 10) & 1023)) as f32 - 1023.0;
                let val = self.lut[li & (LUT_LEN - 1)] * self.white[c] * illum + n * self.amp;
                *v = (val + 0.5).clamp(0.0, 255.0) as u8;
            }
        }
    }
}

/// Separable 5-tap blur with clamped edges, in place (rows in parallel; the result does
/// not depend on the number of threads).
fn blur(f: &mut [f32], w: usize, h: usize, k: &[f32; 5]) {
    let mut tmp = vec![0.0f32; w * h];
    // horizontal: clamped taps at the ends, straight loop in the interior
    let tap = |row: &[f32], x: usize| -> f32 {
        k.iter()
            .enumerate()
            .map(|(j, kj)| {
                kj * row[(x as isize + j as isize - 2).clamp(0, w as isize - 1) as usize]
            })
            .sum()
    };
    tmp.par_chunks_mut(w)
        .zip(f.par_chunks(w))
        .for_each(|(out, row)| {
            if w < 5 {
                for (x, o) in out.iter_mut().enumerate() {
                    *o = tap(row, x);
                }
                return;
            }
            out[0] = tap(row, 0);
            out[1] = tap(row, 1);
            out[w - 2] = tap(row, w - 2);
            out[w - 1] = tap(row, w - 1);
            for (x, win) in row.windows(5).enumerate() {
                out[x + 2] =
                    k[0] * win[0] + k[1] * win[1] + k[2] * win[2] + k[3] * win[3] + k[4] * win[4];
            }
        });
    // vertical, row-wise for cache friendliness
    let tmp = &tmp;
    f.par_chunks_mut(w).enumerate().for_each(|(y, out)| {
        let rows: [usize; 5] = std::array::from_fn(|j| {
            (y as isize + j as isize - 2).clamp(0, h as isize - 1) as usize
        });
        let r: [&[f32]; 5] = rows.map(|r| &tmp[r * w..(r + 1) * w]);
        for (x, o) in out.iter_mut().enumerate() {
            *o = k[0] * r[0][x] + k[1] * r[1][x] + k[2] * r[2][x] + k[3] * r[3][x] + k[4] * r[4][x];
        }
    });
}
