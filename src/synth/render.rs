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

use image::{GrayImage, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

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
fn hash3(a: u32, b: u32, c: u32) -> u32 {
    let mut h = a.wrapping_mul(0x9E37_79B1)
        ^ b.wrapping_mul(0x85EB_CA77).rotate_left(13)
        ^ c.wrapping_mul(0xC2B2_AE3D).rotate_left(7);
    h ^= h >> 15;
    h = h.wrapping_mul(0x2C1B_3C6D);
    h ^= h >> 12;
    h = h.wrapping_mul(0x297A_2D39);
    h ^= h >> 15;
    h
}

/// Uniform in [0, 1) from a hash.
#[inline]
fn hashf(a: u32, b: u32, c: u32) -> f32 {
    (hash3(a, b, c) >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Tileable 2-D value noise on a 256x256 lattice of random values, smooth interpolation.
struct Noise {
    t: Vec<f32>,
}

const NS: usize = 256;

impl Noise {
    fn new(rng: &mut ChaCha8Rng) -> Self {
        Noise {
            t: (0..NS * NS).map(|_| rng.random::<f32>()).collect(),
        }
    }

    #[inline]
    fn at(&self, x: f32, y: f32) -> f32 {
        let xf = x.floor();
        let yf = y.floor();
        let fx = x - xf;
        let fy = y - yf;
        let sx = fx * fx * (3.0 - 2.0 * fx);
        let sy = fy * fy * (3.0 - 2.0 * fy);
        let xi = ((xf as i32) & (NS as i32 - 1)) as usize;
        let yi = ((yf as i32) & (NS as i32 - 1)) as usize;
        let xj = (xi + 1) & (NS - 1);
        let yj = (yi + 1) & (NS - 1);
        let a = self.t[yi * NS + xi];
        let b = self.t[yi * NS + xj];
        let c = self.t[yj * NS + xi];
        let d = self.t[yj * NS + xj];
        lerp(lerp(a, b, sx), lerp(c, d, sx), sy)
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
const CELL_W: &[(f32, f32)] = &[(0.0, 13.0), (0.12, 19.0), (0.4, 44.0), (0.7, 58.0), (1.0, 74.0)];
const CELL_H: &[(f32, f32)] = &[(0.0, 17.0), (0.12, 20.0), (0.4, 33.0), (0.7, 25.0), (1.0, 12.0)];
const NUC_RX: &[(f32, f32)] = &[(0.0, 4.6), (0.12, 6.0), (0.4, 5.4), (0.7, 5.8), (1.0, 7.2)];
const NUC_RY: &[(f32, f32)] = &[(0.0, 7.2), (0.12, 6.0), (0.4, 5.0), (0.7, 3.4), (1.0, 2.0)];
const NUC_H: &[(f32, f32)] = &[(0.0, 1.2), (0.4, 1.0), (0.7, 1.15), (1.0, 1.5)];
const CYTO_H: &[(f32, f32)] = &[(0.0, 0.15), (0.12, 0.11), (0.4, 0.035), (1.0, 0.03)];
const CYTO_E: &[(f32, f32)] = &[(0.0, 0.27), (0.12, 0.26), (0.4, 0.14), (0.7, 0.2), (1.0, 0.4)];
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
            mitoses: 0.006,
            koilocytes: rng.random_range(0.2..0.4),
        },
        Grade::Cin2 => Atypia {
            extent: rng.random_range(0.52..0.66),
            sev: rng.random_range(0.75..0.9),
            mitoses: 0.015,
            koilocytes: rng.random_range(0.05..0.2),
        },
        Grade::Cin3 => Atypia {
            extent: rng.random_range(0.9..1.02),
            sev: rng.random_range(0.9..1.0),
            mitoses: 0.03,
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
        let hv = b.h * tex * (1.0 + b.rim * smoothstep(0.65, 1.0, t));
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
        const R: f32 = 1.5;
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

pub(crate) fn render_full(grade: Grade, width: u32, height: u32, seed: u64, masks: bool) -> Rendered {
    let width = width.max(1);
    let height = height.max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let seed32 = (seed ^ (seed >> 32)) as u32;

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
    let (cwf, chf) = (cw as f32, ch as f32);

    // Magnification: lengths are reference pixels times s.
    let s = ((cwf * chf / REF_AREA).sqrt() * rng.random_range(0.85..1.15)).max(0.02);
    let noise = Noise::new(&mut rng);
    let aty = atypia(grade, &mut rng);

    // ---- geometry of the epithelial band
    let t_mean = (s * rng.random_range(480.0..780.0)).min(0.62 * chf);
    let mut ys0 = chf * rng.random_range(0.05..0.28);
    let over = ys0 + t_mean - 0.86 * chf;
    if over > 0.0 {
        ys0 -= over;
    }
    let yb0 = ys0 + t_mean;
    let tilt = rng.random_range(-0.06f32..0.06);
    let membrane = Wave::random(
        &mut rng,
        &[
            (0.03 * t_mean, 0.09 * t_mean, 0.7 * cwf, 1.6 * cwf),
            (12.0 * s, 40.0 * s, 260.0 * s, 520.0 * s),
            (4.0 * s, 12.0 * s, 80.0 * s, 160.0 * s),
        ],
    );
    let thick = Wave::random(
        &mut rng,
        &[(0.04, 0.12, 0.5 * cwf, 1.4 * cwf), (0.01, 0.05, 300.0 * s, 700.0 * s)],
    );
    let rough = Wave::random(
        &mut rng,
        &[(1.5 * s, 5.0 * s, 40.0 * s, 90.0 * s), (2.0 * s, 8.0 * s, 150.0 * s, 350.0 * s)],
    );
    let ext_wave = Wave::random(&mut rng, &[(0.03, 0.07, 0.4 * cwf, 1.2 * cwf)]);
    let mut band = Band {
        ys: Vec::with_capacity(cw),
        yb: Vec::with_capacity(cw),
        ext: Vec::with_capacity(cw),
    };
    for x in 0..cw {
        let xf = x as f32 + 0.5;
        let yb = yb0 + tilt * (xf - 0.5 * cwf) + membrane.eval(xf);
        let t = t_mean * (1.0 + thick.eval(xf));
        band.yb.push(yb);
        band.ys.push(yb - t + rough.eval(xf));
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
    let maturity = |v: f32, e: f32| -> f32 {
        if e <= 0.0 {
            pl(MATURITY, v)
        } else {
            0.18 + 0.82 * ((v - e) / (1.0 - e).max(1e-3)).clamp(0.0, 1.0)
        }
    };
    let sev = aty.sev;
    let atyp_r = s * rng.random_range(7.6..9.4) * (0.8 + 0.3 * sev);
    let atyp_spread = 0.15 + 0.3 * sev;
    let atyp_cell = 2.45;
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
                    halo: if mitosis { 0.75 } else { 0.0 },
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
                        irr: rng.random_range(0.03..0.08 + 0.12 * sev),
                        phase: rng.random_range(0.0..6.3),
                        h: rng.random_range(1.45..1.95) * (0.9 + 0.15 * sev),
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
                let koilo = m > 0.3 && aty.koilocytes > 0.0 && rng.random_bool(aty.koilocytes as f64);
                cells.push(Cell {
                    x: cx,
                    y,
                    ax: 0.55 * cwid,
                    ay: 0.55 * chgt,
                    cyto_h: pl(CYTO_H, m) * rng.random_range(0.85..1.15),
                    cyto_e: pl(CYTO_E, m) * rng.random_range(0.85..1.15) * if koilo { 1.35 } else { 1.0 },
                    border: pl(BORDER, m),
                    halo: if koilo { rng.random_range(0.5..0.7) } else { 0.0 },
                });
                // the nucleus must lie inside the epithelium
                if y < band.ys[band.col(cx)] + 1.0 {
                    x += step;
                    continue;
                }
                let jitter = 0.12 + 0.25 * smoothstep(0.1, 0.4, m) - 0.25 * smoothstep(0.7, 1.0, m);
                let mut nuc = Blob {
                    x: cx + rng.random_range(-0.08..0.08) * cwid,
                    y,
                    rx: s * pl(NUC_RX, m) * rng.random_range(0.88..1.12),
                    ry: s * pl(NUC_RY, m) * rng.random_range(0.88..1.12),
                    angle: tangent + rng.random_range(-jitter..jitter.max(1e-3)),
                    irr: 0.02,
                    phase: rng.random_range(0.0..6.3),
                    h: pl(NUC_H, m) * rng.random_range(0.9..1.1),
                    e: 0.1,
                    chrom: 0.25,
                    rim: 0.2,
                };
                if koilo {
                    // raisinoid, enlarged, hyperchromatic nucleus; some binucleate
                    nuc.rx = nuc.rx.max(s * 5.0) * 1.45;
                    nuc.ry = nuc.ry.max(s * 3.5) * 1.45;
                    nuc.irr = 0.18;
                    nuc.h = 1.6;
                    nuc.chrom = 0.4;
                    if rng.random_bool(0.2) {
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
    let n_fib = (stroma_area / (s * s * rng.random_range(3500.0..7000.0))) as usize;
    for _ in 0..n_fib {
        if let Some((x, y, _)) = sample_stroma(&mut rng, 3.0 * s) {
            stroma_blobs.push(Blob {
                x,
                y,
                rx: s * rng.random_range(9.0..17.0),
                ry: s * rng.random_range(1.8..3.4),
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
    let n_ves = (cwf / (s * rng.random_range(300.0..650.0))).round() as usize;
    for _ in 0..n_ves {
        let x = rng.random_range(0.0..cwf);
        let yb = band.yb[band.col(x)];
        let y = yb + s * rng.random_range(35.0..320.0);
        let a = s * rng.random_range(10.0..30.0);
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
            h: 0.015,
            e: 0.07,
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
        let fill = rng.random_range(0.1..0.8);
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
                    e: rng.random_range(1.0..1.3),
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
        vessels.push(Vessel { lumen, wall, rbcs, endo });
    }

    // ---- tissue pass
    let epi_top = band.ys.iter().fold(f32::INFINITY, |a, &b| a.min(b)).floor().max(0.0) as usize;
    let epi_bot = (band.yb.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)).ceil() as usize + 2).min(ch);
    let tess = Tessellation::build(cw, epi_top.min(ch), epi_bot, &band, &cells);

    let mut cv = Canvas {
        w: cw,
        h: ch,
        hem: vec![0.0; cw * ch],
        eos: vec![0.0; cw * ch],
    };
    let stroma_e = rng.random_range(0.5..0.62);
    let fibre_wave = Wave::random(&mut rng, &[(6.0 * s, 20.0 * s, 150.0 * s, 400.0 * s)]);
    let wave: Vec<f32> = (0..cw).map(|x| fibre_wave.eval(x as f32)).collect();
    let (fsn, fcs) = fibre_angle.sin_cos();
    let inv_fl = 1.0 / (140.0 * s);
    let inv_fw = 1.0 / (5.0 * s);
    let inv_bl = 1.0 / (320.0 * s);
    let inv_bw = 1.0 / (38.0 * s);
    let inv_fine = 1.0 / (3.0 * s).max(0.5);
    let inv_low = 1.0 / (260.0 * s);
    let lumen_h = rng.random_range(0.005..0.02);
    let lumen_e = rng.random_range(0.01..0.04);
    let line_w = (1.3 * s).max(0.6);
    let bm_w = (2.0 * s).max(0.8);
    for y in 0..ch {
        let yf = y as f32 + 0.5;
        let row = y * cw;
        for x in 0..cw {
            let xf = x as f32 + 0.5;
            let i = row + x;
            let ys = band.ys[x];
            let yb = band.yb[x];
            let (hv, ev);
            if yf < ys {
                // lumen: near-white with faint mucus
                let n = noise.at(xf * inv_low + 11.0, yf * inv_low + 23.0);
                let m = smoothstep(0.55, 0.9, n);
                hv = lumen_h + 0.03 * m;
                ev = lumen_e + 0.05 * m;
            } else if yf < yb {
                let fine = noise.at(xf * inv_fine + 5.0, yf * inv_fine + 7.0);
                match tess.get(x, y) {
                    Some((id, q1, q2)) => {
                        let c = &cells[id as usize];
                        let d1 = q1.sqrt();
                        let mut h = c.cyto_h;
                        let mut e = c.cyto_e;
                        if c.halo > 0.0 {
                            let k = 1.0 - 0.85 * (1.0 - smoothstep(c.halo - 0.08, c.halo, d1));
                            h *= k;
                            e *= k;
                        }
                        let tex = 0.8 + 0.4 * fine;
                        h *= tex;
                        e *= tex;
                        if q2.is_finite() && c.border > 0.0 {
                            let gap = (q2.sqrt() - d1) * 0.5 * c.ax.min(c.ay);
                            let b = (1.0 - gap / line_w).clamp(0.0, 1.0) * c.border;
                            h += 0.05 * b;
                            e += 0.22 * b;
                        }
                        hv = h;
                        ev = e;
                    }
                    None => {
                        hv = 0.06 * (0.8 + 0.4 * fine);
                        ev = 0.22 * (0.8 + 0.4 * fine);
                    }
                }
            } else {
                let depth = yf - yb;
                let yy = yf + wave[x];
                let u = xf * fcs + yy * fsn;
                let w = -xf * fsn + yy * fcs;
                let f = noise.at(u * inv_fl + 17.0, w * inv_fw + 91.0);
                let bnd = noise.at(u * inv_bl + 3.0, w * inv_bw + 5.0);
                let fine = noise.at(xf * inv_fine + 41.0, yf * inv_fine + 13.0);
                let bundle = 0.3 + 0.7 * smoothstep(0.22, 0.55, bnd);
                let mut e = stroma_e * bundle * (0.7 + 0.6 * f) * (0.9 + 0.2 * fine);
                let loose = smoothstep(0.0, 45.0 * s, depth);
                e *= 0.75 + 0.25 * loose;
                if depth < bm_w {
                    e += 0.3;
                }
                hv = 0.025 + 0.03 * fine;
                ev = e;
            }
            cv.hem[i] = hv;
            cv.eos[i] = ev;
        }
    }

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
    let hvec = [0.80 * hue(&mut rng) * h_int, 0.95 * hue(&mut rng) * h_int, 0.42 * hue(&mut rng) * h_int];
    let evec = [0.19 * hue(&mut rng) * e_int, 0.85 * hue(&mut rng) * e_int, 0.53 * hue(&mut rng) * e_int];
    let white = [
        rng.random_range(0.93f32..1.0),
        rng.random_range(0.93f32..1.0),
        rng.random_range(0.93f32..1.0),
    ];
    let bright = rng.random_range(0.94f32..1.0);
    let vignette = rng.random_range(0.0f32..0.12);
    let uneven = rng.random_range(0.05f32..0.2);
    let sigma = rng.random_range(1.5f32..4.0);
    // 255 * exp(-od) for od in [0, 8)
    const LUT_STEP: f32 = 1024.0;
    let lut: Vec<f32> = (0..8 * 1024).map(|i| 255.0 * (-(i as f32) / LUT_STEP).exp()).collect();
    let lut_max = lut.len() - 1;
    let mut out = vec![0u8; cw * ch * 3];
    let (ow, oh) = (width as usize, height as usize);
    let place = |x: usize, y: usize| -> usize {
        let fx = if flip_x { cw - 1 - x } else { x };
        let fy = if flip_y { ch - 1 - y } else { y };
        if transpose {
            fx * ow + fy
        } else {
            fy * ow + fx
        }
    };
    let inv_uneven = 1.0 / (400.0 * s);
    let (hx, hy) = (0.5 * cwf, 0.5 * chf);
    let inv_r2 = 1.0 / (hx * hx + hy * hy);
    for y in 0..ch {
        let yf = y as f32 + 0.5;
        for x in 0..cw {
            let xf = x as f32 + 0.5;
            let i = y * cw + x;
            let k = 1.0 + uneven * (noise.at(xf * inv_uneven + 131.0, yf * inv_uneven + 67.0) - 0.5) * 2.0;
            let hh = cv.hem[i].max(0.0) * k;
            let ee = cv.eos[i].max(0.0) * k;
            let r2 = ((xf - hx) * (xf - hx) + (yf - hy) * (yf - hy)) * inv_r2;
            let illum = bright * (1.0 - vignette * r2);
            let o = place(x, y) * 3;
            for c in 0..3 {
                let od = hh * hvec[c] + ee * evec[c];
                let li = ((od * LUT_STEP) as usize).min(lut_max);
                let n = (hashf(seed32, i as u32, c as u32) + hashf(seed32 ^ 0x5bd1_e995, i as u32, c as u32) - 1.0)
                    * sigma
                    * 1.7;
                out[o + c] = (lut[li] * white[c] * illum + n).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    let image = RgbImage::from_raw(width, height, out).expect("buffer matches the image size");

    let (epithelium, lesion) = if masks {
        let mut epi = vec![0u8; ow * oh];
        let mut les = vec![0u8; ow * oh];
        for y in 0..ch {
            let yf = y as f32 + 0.5;
            for x in 0..cw {
                let (ys, yb) = (band.ys[x], band.yb[x]);
                if yf >= ys && yf < yb {
                    let o = place(x, y);
                    epi[o] = 255;
                    if (yb - yf) / (yb - ys) < band.ext[x] {
                        les[o] = 255;
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
    let _ = (ow, oh);
    Rendered {
        image,
        epithelium,
        lesion,
    }
}

/// Separable 5-tap blur with clamped edges, in place.
fn blur(f: &mut [f32], w: usize, h: usize, k: &[f32; 5]) {
    let mut tmp = vec![0.0f32; w * h];
    // horizontal
    for y in 0..h {
        let row = &f[y * w..(y + 1) * w];
        let out = &mut tmp[y * w..(y + 1) * w];
        for x in 0..w {
            let mut acc = 0.0;
            for (j, kj) in k.iter().enumerate() {
                let xx = (x as isize + j as isize - 2).clamp(0, w as isize - 1) as usize;
                acc += kj * row[xx];
            }
            out[x] = acc;
        }
    }
    // vertical, row-wise for cache friendliness
    for y in 0..h {
        let rows: [usize; 5] = std::array::from_fn(|j| (y as isize + j as isize - 2).clamp(0, h as isize - 1) as usize);
        let out = &mut f[y * w..(y + 1) * w];
        out.fill(0.0);
        for (j, kj) in k.iter().enumerate() {
            let src = &tmp[rows[j] * w..(rows[j] + 1) * w];
            for (o, s) in out.iter_mut().zip(src) {
                *o += kj * s;
            }
        }
    }
}
