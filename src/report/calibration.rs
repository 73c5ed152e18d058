//! Calibration of predicted probabilities: temperature scaling fitted on the
//! validation split, and the expected calibration error with its reliability
//! bins, before and after.
//!
//! Temperature scaling divides the head's logits by one scalar `T` before the
//! softmax (or the sigmoid of a binary head): the ranking of the classes, and
//! so the predicted class, the AUCs and the Grad-CAM maps (which are computed
//! on the logits) are unchanged; only how sure the probabilities say the model
//! is changes. `T` minimises the validation split's mean negative
//! log-likelihood, a one-dimensional convex problem in `1/T`.
//!
//! The expected calibration error (ECE) is the top-label one of Guo et al.
//! (2017): images are put in `bins` equal-width bins of their highest
//! probability, and ECE is the image-weighted mean of |accuracy - mean
//! confidence| over the bins.

use serde::{Deserialize, Serialize};

use crate::model::Task;

/// Probabilities from logits at temperature `t` (one row of logits: the
/// classes', or the single logit of a binary head, which yields
/// `[p(class 0), p(class 1)]`).
pub fn probabilities_at(task: Task, logits: &[f32], t: f64) -> Vec<f64> {
    match task {
        Task::Multiclass => {
            let z: Vec<f64> = logits.iter().map(|&v| f64::from(v) / t).collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        }
        Task::Binary => {
            let z = f64::from(logits[0]) / t;
            let p = 1.0 / (1.0 + (-z).exp());
            vec![p, 1.0 - p]
        }
    }
}

/// Mean negative log-likelihood of `labels` under the logits at temperature `t`
/// (computed stably from log-sum-exp).
pub fn mean_nll(task: Task, logits: &[Vec<f32>], labels: &[usize], t: f64) -> f64 {
    let n = logits.len().max(1) as f64;
    logits
        .iter()
        .zip(labels)
        .map(|(z, &y)| match task {
            Task::Multiclass => {
                let z: Vec<f64> = z.iter().map(|&v| f64::from(v) / t).collect();
                let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                lse - z[y]
            }
            Task::Binary => {
                // The logit is class 0's: -log sigmoid(s*z) = softplus(-s*z).
                let s = if y == 0 { 1.0 } else { -1.0 };
                let x = -s * f64::from(z[0]) / t;
                x.max(0.0) + (-x.abs()).exp().ln_1p()
            }
        })
        .sum::<f64>()
        / n
}

/// The temperature that minimises the mean negative log-likelihood of the
/// validation images, searched over `T` in [0.05, 100] (golden-section search
/// on `ln T` to a relative precision of 1e-9). Fewer than two images, or
/// logits that carry no information, give 1.
pub fn fit_temperature(task: Task, logits: &[Vec<f32>], labels: &[usize]) -> f64 {
    if logits.len() < 2 {
        return 1.0;
    }
    let f = |log_t: f64| mean_nll(task, logits, labels, log_t.exp());
    let (mut a, mut b) = ((0.05f64).ln(), (100f64).ln());
    let phi = (5f64.sqrt() - 1.0) / 2.0;
    let mut c = b - phi * (b - a);
    let mut d = a + phi * (b - a);
    let (mut fc, mut fd) = (f(c), f(d));
    while b - a > 1e-9 {
        if fc <= fd {
            b = d;
            d = c;
            fd = fc;
            c = b - phi * (b - a);
            fc = f(c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + phi * (b - a);
            fd = f(d);
        }
    }
    let t = ((a + b) / 2.0).exp();
    if t.is_finite() {
        t
    } else {
        1.0
    }
}

/// One equal-width bin of top-label confidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    /// Lower and upper confidence bound of the bin.
    pub lower: f64,
    pub upper: f64,
    pub count: usize,
    /// Mean highest probability of the bin's images (None when empty).
    pub confidence: Option<f64>,
    /// Share of the bin's images whose highest-probability class is right.
    pub accuracy: Option<f64>,
}

/// Expected calibration error and the reliability bins it is made of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reliability {
    pub ece: f64,
    pub bins: Vec<ReliabilityBin>,
}

/// Top-label ECE of `probs` (one row per image) against `labels`, with `bins`
/// equal-width bins over (0, 1]: a confidence `c` falls in bin
/// `ceil(c * bins) - 1` (the convention of Guo et al.'s reference code: each bin
/// includes its upper bound). Ties in the highest probability go to the lowest
/// class index.
pub fn reliability(probs: &[Vec<f64>], labels: &[usize], bins: usize) -> Reliability {
    let bins = bins.max(1);
    let mut count = vec![0usize; bins];
    let mut conf = vec![0f64; bins];
    let mut right = vec![0usize; bins];
    for (p, &y) in probs.iter().zip(labels) {
        let (top, c) = p
            .iter()
            .enumerate()
            .fold((0, f64::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            });
        let b = ((c * bins as f64).ceil() as usize).clamp(1, bins) - 1;
        count[b] += 1;
        conf[b] += c;
        right[b] += usize::from(top == y);
    }
    let n = probs.len().max(1) as f64;
    let mut ece = 0.0;
    let bins_out = (0..bins)
        .map(|b| {
            let (confidence, accuracy) = if count[b] == 0 {
                (None, None)
            } else {
                let k = count[b] as f64;
                let (c, a) = (conf[b] / k, right[b] as f64 / k);
                ece += k / n * (a - c).abs();
                (Some(c), Some(a))
            };
            ReliabilityBin {
                lower: b as f64 / bins as f64,
                upper: (b + 1) as f64 / bins as f64,
                count: count[b],
                confidence,
                accuracy,
            }
        })
        .collect();
    Reliability {
        ece,
        bins: bins_out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperature_recovers_a_known_scale() {
        // Logits drawn so that labels follow softmax(z / 2.5): fitting on
        // them must find about 2.5.
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (mut logits, mut labels) = (Vec::new(), Vec::new());
        for _ in 0..20_000 {
            let z: Vec<f32> = (0..4).map(|_| rng.random_range(-6.0f32..6.0)).collect();
            let p = probabilities_at(Task::Multiclass, &z, 2.5);
            let u: f64 = rng.random();
            let mut acc = 0.0;
            let y = p
                .iter()
                .position(|&q| {
                    acc += q;
                    u < acc
                })
                .unwrap_or(3);
            logits.push(z);
            labels.push(y);
        }
        let t = fit_temperature(Task::Multiclass, &logits, &labels);
        assert!((t - 2.5).abs() < 0.1, "T = {t}");
        // The fitted temperature is a minimum of the NLL.
        let at = |t| mean_nll(Task::Multiclass, &logits, &labels, t);
        assert!(at(t) <= at(t * 1.01) && at(t) <= at(t / 1.01));
    }

    #[test]
    fn binary_nll_matches_the_sigmoid() {
        let z = [vec![1.3f32], vec![-0.4]];
        let labels = [0, 0];
        let p0 = 1.0 / (1.0 + (-f64::from(1.3f32) / 2.0).exp());
        let p1 = 1.0 / (1.0 + (f64::from(0.4f32) / 2.0).exp());
        let want = -(p0.ln() + p1.ln()) / 2.0;
        assert!((mean_nll(Task::Binary, &z, &labels, 2.0) - want).abs() < 1e-12);
        assert_eq!(probabilities_at(Task::Binary, &z[0], 2.0)[0], p0);
    }

    #[test]
    fn ece_of_a_hand_computed_case() {
        // Two bins: [0.9, 0.8] right and wrong in the upper bin, 0.4 right in the lower.
        let probs = [vec![0.9, 0.1], vec![0.2, 0.8], vec![0.4, 0.35, 0.25]];
        let r = reliability(&probs, &[0, 0, 0], 2);
        // upper bin: confidence 0.85, accuracy 0.5; lower: 0.4 and 1.
        let want = 2.0 / 3.0 * 0.35 + 1.0 / 3.0 * 0.6;
        assert!((r.ece - want).abs() < 1e-12, "{r:?}");
        assert_eq!(r.bins[1].count, 2);
        // A confidence of exactly 0.5 belongs to the lower bin.
        let r = reliability(&[vec![0.5, 0.5]], &[1], 2);
        assert_eq!(r.bins[0].count, 1);
    }
}
