//! Image-, slide- and patient-level figures on the locked test split, with
//! patient-cluster bootstrap intervals.
//!
//! A slide or patient is graded the way the product grades a slide: its
//! P(CIN2+) is the highest of its images' (P(CIN) for 2-class models), its
//! grade the predicted class of the image that carries it (the first on ties),
//! and its true grade the most severe label among its images. At each level:
//!
//! - accuracy and quadratic-weighted Cohen's kappa of the grade against the
//!   label (classes ordered most severe first; scikit-learn's
//!   `cohen_kappa_score(weights="quadratic", labels=range(K))`);
//! - with a refer band, CIN2+ sensitivity and specificity when CIN2+ is called
//!   at the rule-out threshold (everything not `CIN2+ unlikely`) and at the
//!   rule-in threshold (`CIN2+ likely`), and the triage counts.
//!
//! Images of one patient are not independent, so every interval comes from a
//! bootstrap over patients: each replicate draws as many patients as there are,
//! with replacement, and takes all their images, slides and the patients
//! themselves (a patient drawn twice counts twice). The interval is the 2.5th
//! and 97.5th percentile of the replicates (NumPy's linear interpolation); a
//! replicate where a figure is undefined (no CIN2+ drawn, for a sensitivity)
//! does not count for that figure. Patients are numbered in sorted order of
//! their ids, so given the same draws tools/reference_levels.py reproduces
//! every interval exactly.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::model::triage::cin2_plus_rows;
use crate::model::{ReferBand, Triage};

/// One test image: whose, on which slide, its label and calibrated probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    pub patient: String,
    pub slide: String,
    pub truth: usize,
    pub probabilities: Vec<f64>,
}

/// Which patients each bootstrap replicate draws.
#[derive(Debug, Clone)]
pub enum Draws {
    /// `replicates` replicates from a ChaCha8 generator seeded with `seed`.
    Seeded { replicates: usize, seed: u64 },
    /// Given replicates: patient numbers (sorted-id order), each as many as there are patients.
    Given(Vec<Vec<usize>>),
}

/// Replicates the report uses.
pub const BOOTSTRAP_REPLICATES: usize = 2000;

/// A figure and its bootstrap 95% interval (None where undefined).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    pub value: Option<f64>,
    pub ci95: Option<[f64; 2]>,
}

/// CIN2+ sensitivity and specificity when CIN2+ is called at one threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SensSpec {
    pub threshold: f64,
    pub sensitivity: Figure,
    pub specificity: Figure,
}

/// How many units of each triage, split by whether they are truly CIN2+.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriageCounts {
    /// `[CIN2+, CIN1 or less]` per triage.
    pub likely: [usize; 2],
    pub refer: [usize; 2],
    pub unlikely: [usize; 2],
}

/// The figures of one level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LevelFigures {
    /// `image`, `slide` or `patient`.
    pub level: String,
    pub units: usize,
    /// Units whose true grade is CIN2+ (4- and 3-class models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cin2_plus: Option<usize>,
    pub accuracy: Figure,
    pub kappa_quadratic: Figure,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_out: Option<SensSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_in: Option<SensSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub triage: Option<TriageCounts>,
}

impl LevelFigures {
    /// One line for people: "20 units, kappa 0.91 (0.80-0.98), CIN2+
    /// sensitivity at rule-out 100.0% (100.0-100.0%), specificity at rule-in 95.0% (…)".
    pub fn headline(&self) -> String {
        let ci = |f: &Figure, pct: bool| match (f.value, f.ci95) {
            (Some(v), Some([a, b])) if pct => {
                format!("{:.1}% ({:.1}-{:.1}%)", 100.0 * v, 100.0 * a, 100.0 * b)
            }
            (Some(v), Some([a, b])) => format!("{v:.3} ({a:.3}-{b:.3})"),
            (Some(v), None) if pct => format!("{:.1}%", 100.0 * v),
            (Some(v), None) => format!("{v:.3}"),
            (None, _) => "n/a".into(),
        };
        let mut line = format!(
            "{} units, kappa {}",
            self.units,
            ci(&self.kappa_quadratic, false)
        );
        if let (Some(o), Some(i)) = (&self.rule_out, &self.rule_in) {
            line.push_str(&format!(
                ", CIN2+ sensitivity at rule-out {}, specificity at rule-in {}",
                ci(&o.sensitivity, true),
                ci(&i.specificity, true)
            ));
        }
        line
    }
}

/// Every level's figures and how the intervals were made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Levels {
    pub split: String,
    pub patients: usize,
    pub replicates: usize,
    /// `slide_id` (the labels' column) or `patient_id` (no slide ids: each
    /// patient's images are taken as one slide).
    pub slides_from: String,
    pub levels: Vec<LevelFigures>,
}

/// A graded unit: true class, P(CIN2+) (or P(CIN)), predicted class.
#[derive(Debug, Clone, Copy)]
struct Unit {
    truth: usize,
    score: f64,
    predicted: usize,
}

/// The units of one patient at each level.
struct Patient {
    images: Vec<Unit>,
    slides: Vec<Unit>,
    whole: Unit,
}

fn argmax(p: &[f64]) -> usize {
    (0..p.len()).fold(0, |b, i| if p[i] > p[b] { i } else { b })
}

/// The unit of several images: the most severe label, the highest score and
/// the grade of the image that carries it (the first on ties).
fn merge(units: &[Unit]) -> Unit {
    let deciding = units
        .iter()
        .fold(units[0], |b, u| if u.score > b.score { *u } else { b });
    Unit {
        truth: units
            .iter()
            .map(|u| u.truth)
            .min()
            .expect("a unit has images"),
        ..deciding
    }
}

/// Evaluates `cases` at image, slide and patient level.
pub fn evaluate_levels(
    cases: &[Case],
    classes: &[String],
    band: Option<&ReferBand>,
    draws: &Draws,
    slides_from: &str,
) -> Levels {
    let rows = cin2_plus_rows(classes);
    let positive_rows: Vec<usize> = if rows.is_empty() { vec![0] } else { rows };
    let score = |p: &[f64]| positive_rows.iter().map(|&i| p[i]).sum::<f64>();
    let mut by_patient: BTreeMap<&str, BTreeMap<&str, Vec<Unit>>> = BTreeMap::new();
    for c in cases {
        by_patient
            .entry(&c.patient)
            .or_default()
            .entry(&c.slide)
            .or_default()
            .push(Unit {
                truth: c.truth,
                score: score(&c.probabilities),
                predicted: argmax(&c.probabilities),
            });
    }
    let patients: Vec<Patient> = by_patient
        .values()
        .map(|slides| {
            let images: Vec<Unit> = slides.values().flatten().copied().collect();
            Patient {
                slides: slides.values().map(|s| merge(s)).collect(),
                whole: merge(&images),
                images,
            }
        })
        .collect();
    let draws: Vec<Vec<usize>> = match draws {
        Draws::Given(d) => d.clone(),
        Draws::Seeded { replicates, seed } => {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(*seed);
            let n = patients.len();
            (0..*replicates)
                .map(|_| (0..n).map(|_| rng.random_range(0..n)).collect())
                .collect()
        }
    };
    let cin2 = !cin2_plus_rows(classes).is_empty();
    let positive = |u: &Unit| positive_rows.contains(&u.truth);
    let k = classes.len();
    let levels = ["image", "slide", "patient"]
        .iter()
        .map(|&level| {
            let units_of = |p: &Patient| -> Vec<Unit> {
                match level {
                    "image" => p.images.clone(),
                    "slide" => p.slides.clone(),
                    _ => vec![p.whole],
                }
            };
            let all: Vec<Unit> = patients.iter().flat_map(units_of).collect();
            let replicates: Vec<Vec<Unit>> = draws
                .iter()
                .map(|d| d.iter().flat_map(|&i| units_of(&patients[i])).collect())
                .collect();
            let figure = |f: &dyn Fn(&[Unit]) -> Option<f64>| Figure {
                value: f(&all),
                ci95: percentile_interval(replicates.iter().filter_map(|r| f(r)).collect()),
            };
            let sens_spec = |threshold: f64| SensSpec {
                threshold,
                sensitivity: figure(&|u: &[Unit]| {
                    rate(u, |x| positive(x), |x| x.score >= threshold)
                }),
                specificity: figure(&|u: &[Unit]| {
                    rate(u, |x| !positive(x), |x| x.score < threshold)
                }),
            };
            let band = band.filter(|_| cin2);
            LevelFigures {
                level: level.to_string(),
                units: all.len(),
                cin2_plus: cin2.then(|| all.iter().filter(|u| positive(u)).count()),
                accuracy: figure(&|u: &[Unit]| rate(u, |_| true, |x| x.predicted == x.truth)),
                kappa_quadratic: figure(&|u: &[Unit]| quadratic_kappa(u, k)),
                rule_out: band.map(|b| sens_spec(b.rule_out.threshold)),
                rule_in: band.map(|b| sens_spec(b.rule_in.threshold)),
                triage: band.map(|b| {
                    let mut t = TriageCounts::default();
                    for u in &all {
                        let slot = match b.triage(u.score) {
                            Triage::Likely => &mut t.likely,
                            Triage::Refer => &mut t.refer,
                            Triage::Unlikely => &mut t.unlikely,
                        };
                        slot[usize::from(!positive(u))] += 1;
                    }
                    t
                }),
            }
        })
        .collect();
    Levels {
        split: "test".into(),
        patients: patients.len(),
        replicates: draws.len(),
        slides_from: slides_from.into(),
        levels,
    }
}

/// Among the units `of` selects, the fraction that `hit`; None when none is selected.
fn rate(units: &[Unit], of: impl Fn(&Unit) -> bool, hit: impl Fn(&Unit) -> bool) -> Option<f64> {
    let (mut n, mut h) = (0usize, 0usize);
    for u in units.iter().filter(|u| of(u)) {
        n += 1;
        h += usize::from(hit(u));
    }
    (n > 0).then(|| h as f64 / n as f64)
}

/// Cohen's kappa with quadratic weights over classes `0..k`; None when the
/// expected disagreement is zero (one class only).
pub fn quadratic_kappa_of(truth: &[usize], predicted: &[usize], k: usize) -> Option<f64> {
    let mut o = vec![vec![0f64; k]; k];
    for (&t, &p) in truth.iter().zip(predicted) {
        o[t][p] += 1.0;
    }
    let n = truth.len() as f64;
    let rows: Vec<f64> = o.iter().map(|r| r.iter().sum()).collect();
    let cols: Vec<f64> = (0..k).map(|j| o.iter().map(|r| r[j]).sum()).collect();
    let (mut observed, mut expected) = (0.0, 0.0);
    for i in 0..k {
        for j in 0..k {
            let w = ((i as f64) - (j as f64)).powi(2);
            observed += w * o[i][j];
            expected += w * rows[i] * cols[j] / n;
        }
    }
    (expected > 0.0).then(|| 1.0 - observed / expected)
}

fn quadratic_kappa(units: &[Unit], k: usize) -> Option<f64> {
    let truth: Vec<usize> = units.iter().map(|u| u.truth).collect();
    let predicted: Vec<usize> = units.iter().map(|u| u.predicted).collect();
    quadratic_kappa_of(&truth, &predicted, k)
}

/// NumPy's `percentile(values, q)` (linear interpolation) of non-empty `v`.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let pos = q / 100.0 * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// NumPy's `percentile(values, [2.5, 97.5])`; None without values.
fn percentile_interval(v: Vec<f64>) -> Option<[f64; 2]> {
    (!v.is_empty()).then(|| [percentile(&v, 2.5), percentile(&v, 97.5)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes() -> Vec<String> {
        ["CIN3", "CIN2", "CIN1", "Non-neoplasm"]
            .map(String::from)
            .to_vec()
    }

    fn case(patient: &str, slide: &str, truth: usize, p: [f64; 4]) -> Case {
        Case {
            patient: patient.into(),
            slide: slide.into(),
            truth,
            probabilities: p.to_vec(),
        }
    }

    #[test]
    fn kappa_matches_hand_computed_values() {
        // Perfect agreement, and the textbook 2x2 with k = 0.4 (unweighted =
        // quadratic for two classes): o = [[20, 5], [10, 15]].
        assert_eq!(quadratic_kappa_of(&[0, 1, 2], &[0, 1, 2], 3), Some(1.0));
        let mut t = vec![0; 25];
        t.extend(vec![1; 25]);
        let mut p = vec![0; 20];
        p.extend(vec![1; 5]);
        p.extend(vec![0; 10]);
        p.extend(vec![1; 15]);
        assert!((quadratic_kappa_of(&t, &p, 2).unwrap() - 0.4).abs() < 1e-12);
        assert_eq!(quadratic_kappa_of(&[1, 1], &[1, 1], 3), None);
    }

    #[test]
    fn slides_and_patients_take_the_image_with_the_highest_p_cin2_plus() {
        let cases = [
            // P1: a CIN2 slide whose deciding image is predicted CIN1 (0.5
            // CIN2+), and a Non-neoplasm slide.
            case("P1", "S1", 1, [0.1, 0.4, 0.45, 0.05]),
            case("P1", "S1", 2, [0.0, 0.1, 0.8, 0.1]),
            case("P1", "S2", 3, [0.0, 0.05, 0.05, 0.9]),
            case("P2", "S3", 3, [0.0, 0.0, 0.1, 0.9]),
        ];
        let draws = Draws::Given(vec![vec![0, 1], vec![1, 1]]);
        let l = evaluate_levels(&cases, &classes(), None, &draws, "slide_id");
        let [image, slide, patient] = &l.levels[..] else {
            panic!()
        };
        assert_eq!((image.units, slide.units, patient.units), (4, 3, 2));
        assert_eq!(image.cin2_plus, Some(1));
        // Images: 3 of 4 right (the CIN2 image is predicted CIN1).
        assert_eq!(image.accuracy.value, Some(0.75));
        // Slides: S1 is CIN2 graded CIN1, S2 and S3 right.
        assert!((slide.accuracy.value.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        // Patients: P1 is CIN2 graded CIN1 (its highest P(CIN2+) image), P2 right.
        assert_eq!(patient.accuracy.value, Some(0.5));
        // Replicate 1 has both patients (0.5), replicate 2 P2 twice (1.0).
        assert_eq!(patient.accuracy.ci95, Some([0.5125, 0.9875]));
        assert_eq!(l.replicates, 2);
    }

    #[test]
    fn seeded_draws_are_reproducible_and_cover_every_patient() {
        let cases: Vec<Case> = (0..20)
            .map(|i| {
                let t = i % 4;
                let mut p = [0.1; 4];
                p[t] = 0.7;
                case(&format!("P{i:02}"), "S", t, p)
            })
            .collect();
        let draws = Draws::Seeded {
            replicates: 400,
            seed: 7,
        };
        let a = evaluate_levels(&cases, &classes(), None, &draws, "patient_id");
        let b = evaluate_levels(&cases, &classes(), None, &draws, "patient_id");
        assert_eq!(a, b);
        assert_eq!(a.levels[0].kappa_quadratic.value, Some(1.0));
        assert_eq!(a.levels[0].kappa_quadratic.ci95, Some([1.0, 1.0]));
    }
}
