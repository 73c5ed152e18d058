//! Input quality control: is an image what the model was made for?
//!
//! Measured on the decoded original reduced to the model's input size
//! (area averaging, as the model sees it, but **before** CLAHE, which would
//! stretch a blank or washed-out image into texture), in one pass:
//!
//! - `focus`: variance of the 3x3 Laplacian of the grey image (OpenCV's
//!   `cv2.Laplacian(grey, CV_64F, ksize=1).var()`, borders reflected 101,
//!   grey as `cv2.cvtColor(RGB2GRAY)`): low when the image is out of focus;
//! - `tissue_fraction`: share of pixels that are neither glass (grey at least
//!   200 and channels within 25 of each other) nor dark (grey below 25);
//! - `overexposed_fraction`: share of pixels with every channel at 250 or more;
//! - `underexposed_fraction`: share of dark pixels (grey below 25).
//!
//! Each measurement has a threshold ([`QualityThresholds`], the bundle's
//! `quality` section or the defaults), and the original's size and aspect ratio
//! are checked against what a scanner produces. After the backbone, bundles
//! trained by `cinflow train` add an out-of-distribution score of the pooled
//! features ([`crate::model::ood`]), flagged `ood` above its threshold. A
//! failed check is a flag with
//! its reason; a flagged image is triaged `refer` and left out of the slide
//! grade ([`crate::result::slide_grade`]). tests/quality.rs checks the
//! measurements against OpenCV.

use image::RgbImage;
use serde::{Deserialize, Serialize};

/// Grey level at or above which an unsaturated pixel is glass.
const GLASS_GREY: u8 = 200;
/// Largest channel spread of a glass pixel.
const GLASS_SPREAD: u8 = 25;
/// Grey level below which a pixel is dark.
const DARK_GREY: u8 = 25;
/// Channel value at or above which a pixel is clipped white.
const CLIPPED: u8 = 250;

/// The measurements of one image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Measurements {
    pub focus: f64,
    pub tissue_fraction: f64,
    pub overexposed_fraction: f64,
    pub underexposed_fraction: f64,
}

/// One failed check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QcFlag {
    /// `focus`, `tissue`, `overexposed`, `underexposed`, `size`, `aspect` or `ood`.
    pub check: String,
    /// What was measured against what was expected, in words.
    pub reason: String,
}

/// An image's measurements and the checks it failed (none: it passed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageQuality {
    #[serde(flatten)]
    pub measurements: Measurements,
    /// Mahalanobis distance of the pooled features from the training images'
    /// (bundles with an OOD model; see [`crate::model::ood`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ood_distance: Option<f64>,
    pub flags: Vec<QcFlag>,
}

impl ImageQuality {
    pub fn passed(&self) -> bool {
        self.flags.is_empty()
    }

    /// Adds the out-of-distribution score of the pooled features, flagged
    /// when it is above the bundle's threshold.
    pub fn with_ood(mut self, distance: f64, spec: &crate::model::OodSpec) -> ImageQuality {
        self.ood_distance = Some(distance);
        if distance > spec.threshold {
            self.flags.push(QcFlag {
                check: "ood".into(),
                reason: format!(
                    "unlike the images the model was trained on: distance {distance:.1} above {:.1} (the {}th percentile of its {} images)",
                    spec.threshold, spec.percentile, spec.threshold_from
                ),
            });
        }
        self
    }

    /// The failed checks in one line ("focus 3.1 below 20; ...").
    pub fn summary(&self) -> String {
        self.flags
            .iter()
            .map(|f| f.reason.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Input quality of the validation images when a model version was trained:
/// each measurement's spread and how many of those images each limit flags.
/// It shows whether the limits suit the lab's scanner (a limit that flags many
/// of the images the model was made for is too strict for them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QualityReview {
    /// The split measured (`validation`) and how many images.
    pub fitted_on: String,
    pub images: usize,
    /// The percentiles given for each measurement (NumPy's linear interpolation).
    pub percentiles: Vec<f64>,
    pub focus: Vec<f64>,
    pub tissue_fraction: Vec<f64>,
    pub overexposed_fraction: Vec<f64>,
    pub underexposed_fraction: Vec<f64>,
    /// The limits that were applied.
    pub thresholds: QualityThresholds,
    /// Images each check flags, by check name (`focus`, `tissue`, ...; `ood`
    /// against the version's own out-of-distribution threshold).
    pub flagged: std::collections::BTreeMap<String, usize>,
    /// Images flagged by at least one check.
    pub flagged_images: usize,
}

/// The percentiles a [`QualityReview`] reports.
pub const REVIEW_PERCENTILES: [f64; 5] = [1.0, 5.0, 50.0, 95.0, 99.0];

impl QualityReview {
    /// The review of `images` (measurements and flags, OOD included) under `thresholds`.
    pub fn of(images: &[&ImageQuality], thresholds: QualityThresholds) -> QualityReview {
        let spread = |get: fn(&Measurements) -> f64| -> Vec<f64> {
            let v: Vec<f64> = images.iter().map(|q| get(&q.measurements)).collect();
            if v.is_empty() {
                return vec![];
            }
            REVIEW_PERCENTILES
                .iter()
                .map(|&q| crate::report::levels::percentile(&v, q))
                .collect()
        };
        let mut flagged = std::collections::BTreeMap::new();
        for q in images {
            let checks: std::collections::BTreeSet<&str> =
                q.flags.iter().map(|f| f.check.as_str()).collect();
            for c in checks {
                *flagged.entry(c.to_string()).or_insert(0) += 1;
            }
        }
        QualityReview {
            fitted_on: "validation".into(),
            images: images.len(),
            percentiles: REVIEW_PERCENTILES.to_vec(),
            focus: spread(|m| m.focus),
            tissue_fraction: spread(|m| m.tissue_fraction),
            overexposed_fraction: spread(|m| m.overexposed_fraction),
            underexposed_fraction: spread(|m| m.underexposed_fraction),
            thresholds,
            flagged,
            flagged_images: images.iter().filter(|q| !q.passed()).count(),
        }
    }

    /// Share of the reviewed images flagged by at least one check.
    pub fn flagged_share(&self) -> f64 {
        self.flagged_images as f64 / self.images.max(1) as f64
    }
}

/// The limits an image must stay within; a bundle may set its own
/// (`quality` in the manifest), otherwise these defaults apply.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QualityThresholds {
    /// Least Laplacian variance at the model's input size.
    pub min_focus: f64,
    /// Least share of tissue.
    pub min_tissue_fraction: f64,
    /// Largest share of clipped white pixels.
    pub max_overexposed_fraction: f64,
    /// Largest share of dark pixels.
    pub max_underexposed_fraction: f64,
    /// Shortest side of the original, in pixels.
    pub min_side: u32,
    /// Largest ratio of the original's long side to its short side.
    pub max_aspect: f64,
}

impl Default for QualityThresholds {
    fn default() -> Self {
        QualityThresholds {
            min_focus: 20.0,
            min_tissue_fraction: 0.2,
            max_overexposed_fraction: 0.25,
            max_underexposed_fraction: 0.5,
            min_side: 400,
            max_aspect: 2.5,
        }
    }
}

impl QualityThresholds {
    /// Every threshold that is out of its range, named.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        if !(self.min_focus.is_finite() && self.min_focus >= 0.0) {
            p.push(format!("quality min_focus {} must be >= 0", self.min_focus));
        }
        for (name, v) in [
            ("min_tissue_fraction", self.min_tissue_fraction),
            ("max_overexposed_fraction", self.max_overexposed_fraction),
            ("max_underexposed_fraction", self.max_underexposed_fraction),
        ] {
            if !unit(v) {
                p.push(format!("quality {name} {v} is out of range [0, 1]"));
            }
        }
        if !(self.max_aspect.is_finite() && self.max_aspect >= 1.0) {
            p.push(format!(
                "quality max_aspect {} must be >= 1",
                self.max_aspect
            ));
        }
        p
    }

    /// The checks an image with `m` and original size `(w, h)` fails.
    pub fn flags(&self, m: &Measurements, (w, h): (u32, u32)) -> Vec<QcFlag> {
        let mut f = Vec::new();
        let mut flag = |check: &str, reason: String| {
            f.push(QcFlag {
                check: check.into(),
                reason,
            })
        };
        if m.focus < self.min_focus {
            flag(
                "focus",
                format!(
                    "out of focus: Laplacian variance {:.1} below {:.1}",
                    m.focus, self.min_focus
                ),
            );
        }
        if m.tissue_fraction < self.min_tissue_fraction {
            flag(
                "tissue",
                format!(
                    "too little tissue: {:.0}% of the image, at least {:.0}% expected",
                    100.0 * m.tissue_fraction,
                    100.0 * self.min_tissue_fraction
                ),
            );
        }
        if m.overexposed_fraction > self.max_overexposed_fraction {
            flag(
                "overexposed",
                format!(
                    "overexposed: {:.0}% of pixels clipped white, at most {:.0}% expected",
                    100.0 * m.overexposed_fraction,
                    100.0 * self.max_overexposed_fraction
                ),
            );
        }
        if m.underexposed_fraction > self.max_underexposed_fraction {
            flag(
                "underexposed",
                format!(
                    "underexposed: {:.0}% of pixels dark, at most {:.0}% expected",
                    100.0 * m.underexposed_fraction,
                    100.0 * self.max_underexposed_fraction
                ),
            );
        }
        if w.min(h) < self.min_side {
            flag(
                "size",
                format!(
                    "{w}x{h} is smaller than a scanner field (shortest side at least {} pixels)",
                    self.min_side
                ),
            );
        }
        let aspect = f64::from(w.max(h)) / f64::from(w.min(h).max(1));
        if aspect > self.max_aspect {
            flag(
                "aspect",
                format!(
                    "{w}x{h} has aspect ratio {aspect:.2}, at most {:.2} expected",
                    self.max_aspect
                ),
            );
        }
        f
    }
}

/// `cv2.cvtColor(RGB2GRAY)` on one pixel: OpenCV's 15-bit fixed point
/// (0.299, 0.587, 0.114 as 9798, 19235, 3735 / 2^15, rounded; the 14-bit
/// coefficients of older releases differ by one level on about 0.3% of pixels).
fn grey([r, g, b]: [u8; 3]) -> u8 {
    ((u32::from(r) * 9798 + u32::from(g) * 19235 + u32::from(b) * 3735 + (1 << 14)) >> 15) as u8
}

/// The measurements of `thumb`: the original reduced to the model's input size.
pub fn measure(thumb: &RgbImage) -> Measurements {
    let (w, h) = (thumb.width() as usize, thumb.height() as usize);
    let n = (w * h).max(1) as f64;
    let mut g = Vec::with_capacity(w * h);
    let (mut glass, mut dark, mut clipped) = (0usize, 0usize, 0usize);
    for px in thumb.pixels() {
        let y = grey(px.0);
        let (lo, hi) = (px.0.iter().min().unwrap(), px.0.iter().max().unwrap());
        glass += usize::from(y >= GLASS_GREY && hi - lo <= GLASS_SPREAD);
        dark += usize::from(y < DARK_GREY);
        clipped += usize::from(*lo >= CLIPPED);
        g.push(y);
    }
    Measurements {
        focus: laplacian_variance(&g, w, h),
        tissue_fraction: 1.0 - (glass + dark) as f64 / n,
        overexposed_fraction: clipped as f64 / n,
        underexposed_fraction: dark as f64 / n,
    }
}

/// Population variance of the 4-neighbour Laplacian, borders reflected 101
/// (`gfedcb|abcdefgh|gfedcba`), as `cv2.Laplacian(g, CV_64F, ksize=1).var()`.
fn laplacian_variance(g: &[u8], w: usize, h: usize) -> f64 {
    if w < 2 || h < 2 {
        return 0.0;
    }
    let reflect = |i: isize, n: usize| -> usize {
        if i < 0 {
            (-i) as usize
        } else if i as usize >= n {
            2 * (n - 1) - i as usize
        } else {
            i as usize
        }
    };
    let at = |x: isize, y: isize| i64::from(g[reflect(y, h) * w + reflect(x, w)]);
    // |l| <= 1020, so even MAX_PIXELS squares sum far below i64::MAX.
    let (mut sum, mut sum_sq) = (0i64, 0i64);
    let mut add = |l: i64| {
        sum += l;
        sum_sq += l * l;
    };
    for y in 0..h {
        let border_row = y == 0 || y == h - 1;
        let edge = |x: usize| {
            let (x, y) = (x as isize, y as isize);
            at(x - 1, y) + at(x + 1, y) + at(x, y - 1) + at(x, y + 1) - 4 * at(x, y)
        };
        if border_row {
            (0..w).for_each(|x| add(edge(x)));
            continue;
        }
        add(edge(0));
        // Inside the image no neighbour needs reflecting.
        let (up, row, down) = (
            &g[(y - 1) * w..y * w],
            &g[y * w..(y + 1) * w],
            &g[(y + 1) * w..(y + 2) * w],
        );
        for x in 1..w - 1 {
            let l = i64::from(row[x - 1])
                + i64::from(row[x + 1])
                + i64::from(up[x])
                + i64::from(down[x])
                - 4 * i64::from(row[x]);
            add(l);
        }
        add(edge(w - 1));
    }
    let n = (w * h) as f64;
    let mean = sum as f64 / n;
    sum_sq as f64 / n - mean * mean
}

/// Measures the decoded original at the model's input size and checks it.
pub fn check(
    original: &RgbImage,
    (width, height): (u32, u32),
    thresholds: &QualityThresholds,
) -> ImageQuality {
    let thumb = crate::preprocess::resize(original, width, height);
    let measurements = measure(&thumb);
    ImageQuality {
        flags: thresholds.flags(&measurements, original.dimensions()),
        measurements,
        ood_distance: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grey_matches_opencv_fixed_point() {
        // cv2.cvtColor(np.array([[[255,0,0],[0,255,0],[0,0,255],[12,200,77],
        // [1,2,3],[128,128,128]]], np.uint8), cv2.COLOR_RGB2GRAY)
        assert_eq!(
            [
                [255, 0, 0],
                [0, 255, 0],
                [0, 0, 255],
                [12, 200, 77],
                [1, 2, 3],
                [128; 3]
            ]
            .map(grey),
            [76, 150, 29, 130, 2, 128]
        );
    }

    #[test]
    fn laplacian_of_a_flat_image_is_zero_and_of_a_dot_is_known() {
        assert_eq!(laplacian_variance(&[7; 12], 4, 3), 0.0);
        // One pixel of 3 in the middle of 3x3: the Laplacian is -12 there and 6
        // at its four neighbours (each reflects the centre twice), 0 at the
        // corners; OpenCV gives the same map and variance 30.2222.
        let mut g = [0u8; 9];
        g[4] = 3;
        let want = 288.0 / 9.0 - (12.0f64 / 9.0).powi(2);
        assert!((laplacian_variance(&g, 3, 3) - want).abs() < 1e-12);
    }

    #[test]
    fn laplacian_interior_fast_path_equals_reflecting_everywhere() {
        let (w, h) = (37usize, 23usize);
        let g: Vec<u8> = (0..w * h).map(|i| ((i * 7919) % 251) as u8).collect();
        let reflect = |i: isize, n: usize| -> usize {
            let n = n as isize;
            (if i < 0 {
                -i
            } else if i >= n {
                2 * (n - 1) - i
            } else {
                i
            }) as usize
        };
        let at = |x: isize, y: isize| f64::from(g[reflect(y, h) * w + reflect(x, w)]);
        let l: Vec<f64> = (0..h as isize)
            .flat_map(|y| (0..w as isize).map(move |x| (x, y)))
            .map(|(x, y)| {
                at(x - 1, y) + at(x + 1, y) + at(x, y - 1) + at(x, y + 1) - 4.0 * at(x, y)
            })
            .collect();
        let n = l.len() as f64;
        let mean = l.iter().sum::<f64>() / n;
        let want = l.iter().map(|v| v * v).sum::<f64>() / n - mean * mean;
        assert!((laplacian_variance(&g, w, h) - want).abs() < 1e-9 * want);
    }

    #[test]
    fn blank_glass_and_dark_images_are_flagged_with_reasons() {
        let t = QualityThresholds::default();
        let glass = RgbImage::from_pixel(800, 600, image::Rgb([235, 236, 238]));
        let q = check(&glass, (800, 600), &t);
        let checks: Vec<&str> = q.flags.iter().map(|f| f.check.as_str()).collect();
        assert_eq!(checks, ["focus", "tissue"]);
        assert!(q.summary().contains("too little tissue: 0% of the image"));
        let white = RgbImage::from_pixel(1000, 800, image::Rgb([255, 255, 255]));
        let q = check(&white, (800, 600), &t);
        assert!(q.flags.iter().any(|f| f.check == "overexposed"));
        let dark = RgbImage::from_pixel(1000, 800, image::Rgb([5, 5, 8]));
        let q = check(&dark, (800, 600), &t);
        assert!(q.flags.iter().any(|f| f.check == "underexposed"));
        let strip = RgbImage::from_fn(3000, 500, |x, y| {
            image::Rgb([((x * 7 + y * 3) % 200) as u8, 90, 140])
        });
        let q = check(&strip, (800, 600), &t);
        let checks: Vec<&str> = q.flags.iter().map(|f| f.check.as_str()).collect();
        assert_eq!(checks, ["aspect"], "{q:?}");
    }
}
