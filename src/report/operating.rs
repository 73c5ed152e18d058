//! Choosing the CIN2+ triage thresholds on the validation split.
//!
//! An image is called CIN2+ at threshold `t` when its P(CIN2+) `>= t`, as in
//! scikit-learn's `roc_curve`. The candidate thresholds are the scores
//! themselves, so a chosen threshold is always one of them:
//!
//! - **rule-out** (high sensitivity): the largest score `t` whose sensitivity
//!   `#{CIN2+ with p >= t} / #CIN2+` is at least the target, then lowered to
//!   the smallest score with the same specificity — so the threshold sits just
//!   above the CIN1-or-less images below it instead of just below the CIN2+
//!   images above it, and a confident model does not call a P(CIN2+) of 0.9
//!   "unlikely";
//! - **rule-in** (high specificity): the smallest score `t` whose specificity
//!   `#{CIN1-or-less with p < t} / #CIN1-or-less` is at least the target, then
//!   raised to the largest score with the same sensitivity (the lowest CIN2+
//!   score at or above it); when only a threshold above every score reaches
//!   the target, or no CIN2+ image lies above it, the next float above the
//!   highest score (no image of that split is called CIN2+ likely).
//!
//! Both moves trade nothing on the split itself and widen the refer band into
//! the gap between the two kinds of image, where the model has seen nothing.
//! When the rule-in threshold comes out below the rule-out one, one threshold
//! meets both targets: rule-in is raised to rule-out and the band is empty on
//! this split. tests/train.rs checks the choice against scikit-learn.

use crate::model::{OperatingPoint, ReferBand};

/// Sensitivity and specificity of calling `scores >= threshold` positive.
pub fn sensitivity_specificity(scores: &[f64], positive: &[bool], threshold: f64) -> (f64, f64) {
    let (mut tp, mut pos, mut tn, mut neg) = (0usize, 0usize, 0usize, 0usize);
    for (&s, &y) in scores.iter().zip(positive) {
        if y {
            pos += 1;
            tp += usize::from(s >= threshold);
        } else {
            neg += 1;
            tn += usize::from(s < threshold);
        }
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    (ratio(tp, pos), ratio(tn, neg))
}

/// How many of `n` reach a fraction `target` (robust to `0.95 * 20` being 19.000000000000004).
fn at_least(target: f64, n: usize) -> usize {
    ((target * n as f64) - 1e-9).ceil().max(0.0) as usize
}

fn point(scores: &[f64], positive: &[bool], threshold: f64, target: f64) -> OperatingPoint {
    let (sensitivity, specificity) = sensitivity_specificity(scores, positive, threshold);
    OperatingPoint {
        threshold,
        target,
        sensitivity,
        specificity,
    }
}

/// The next float above a probability `x >= 0` (`f64::next_up` for the
/// non-negative numbers scores are).
fn next_above(x: f64) -> f64 {
    f64::from_bits(x.max(0.0).to_bits() + 1)
}

/// The two thresholds for `scores` (P(CIN2+) per image) and which images are
/// CIN2+. None when the split has no CIN2+ image or none of CIN1 or less.
pub fn fit_refer_band(
    scores: &[f64],
    positive: &[bool],
    classes: Vec<String>,
    target_sensitivity: f64,
    target_specificity: f64,
) -> Option<ReferBand> {
    assert_eq!(scores.len(), positive.len(), "one label per score");
    let mut pos: Vec<f64> = scores
        .iter()
        .zip(positive)
        .filter(|p| *p.1)
        .map(|p| *p.0)
        .collect();
    let mut neg: Vec<f64> = scores
        .iter()
        .zip(positive)
        .filter(|p| !*p.1)
        .map(|p| *p.0)
        .collect();
    if pos.is_empty() || neg.is_empty() {
        return None;
    }
    pos.sort_by(|a, b| b.total_cmp(a));
    neg.sort_by(|a, b| b.total_cmp(a));
    let highest = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lowest = scores.iter().cloned().fold(f64::INFINITY, f64::min);
    let smallest_above = |x: f64| {
        scores
            .iter()
            .cloned()
            .filter(|&s| s > x)
            .fold(f64::INFINITY, f64::min)
    };
    // Rule-out: the k-th highest CIN2+ score keeps k of them at or above it;
    // then down to the smallest score with the same specificity (just above
    // the highest CIN1-or-less score below it).
    let k = at_least(target_sensitivity, pos.len()).clamp(1, pos.len());
    let reached = pos[k - 1];
    let rule_out = match neg.iter().find(|&&s| s < reached) {
        Some(&below) => smallest_above(below),
        None => lowest,
    };
    // Rule-in: at most m negatives may be at or above it, so it must lie above
    // the (m+1)-th highest negative score: the smallest score that does; then
    // up to the lowest CIN2+ score at or above it (the same sensitivity).
    let m = neg.len() - at_least(target_specificity, neg.len()).min(neg.len());
    let reached = if m >= neg.len() {
        lowest
    } else {
        smallest_above(neg[m])
    };
    let never = next_above(highest);
    let rule_in = match pos.iter().rev().find(|&&s| s >= reached) {
        Some(&p) if reached.is_finite() => p,
        _ => never,
    };
    let rule_in = rule_in.max(rule_out);
    Some(ReferBand {
        classes,
        fitted_on: "validation".into(),
        positives: pos.len(),
        negatives: neg.len(),
        rule_out: point(scores, positive, rule_out, target_sensitivity),
        rule_in: point(scores, positive, rule_in, target_specificity),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn band(scores: &[f64], positive: &[bool], se: f64, sp: f64) -> ReferBand {
        fit_refer_band(scores, positive, vec!["CIN2-3".into()], se, sp).unwrap()
    }

    #[test]
    fn thresholds_reach_their_targets_and_no_further() {
        // 20 positives at 0.05, 0.10, ..., 1.00; 20 negatives at 0.025, 0.075, ...
        let mut scores = Vec::new();
        let mut positive = Vec::new();
        for i in 1..=20 {
            scores.push(i as f64 * 0.05);
            positive.push(true);
            scores.push(i as f64 * 0.05 - 0.025);
            positive.push(false);
        }
        let b = band(&scores, &positive, 0.95, 0.95);
        // 19 of 20 positives kept: the second-lowest positive, 0.10.
        assert!((b.rule_out.threshold - 0.10).abs() < 1e-12);
        assert!((b.rule_out.sensitivity - 0.95).abs() < 1e-12);
        // At most one negative (0.975) at or above: the smallest score above
        // the second-highest negative (0.925) is the positive at 0.95.
        assert!((b.rule_in.threshold - 0.95).abs() < 1e-12);
        assert!((b.rule_in.specificity - 0.95).abs() < 1e-12);
        assert_eq!((b.positives, b.negatives), (20, 20));
        // A stricter target moves each threshold outwards.
        let strict = band(&scores, &positive, 1.0, 1.0);
        assert!((strict.rule_out.threshold - 0.05).abs() < 1e-12);
        assert!((strict.rule_in.threshold - 1.0).abs() < 1e-12);
    }

    #[test]
    fn thresholds_sit_in_the_gap_between_the_two_kinds_of_image() {
        // A confident model: 19 of 20 CIN2+ images near 1, one at 0.4; CIN1
        // or less at 0.01-0.20. The 95% rule-out is not the 19th CIN2+ score
        // (0.98) but the lowest score above every negative below it (0.4).
        let mut scores: Vec<f64> = (0..19).map(|i| 0.98 + i as f64 * 0.001).collect();
        scores.push(0.4);
        let mut positive = vec![true; 20];
        scores.extend((1..=20).map(|i| i as f64 * 0.01));
        positive.extend([false; 20]);
        let b = band(&scores, &positive, 0.95, 0.95);
        assert_eq!(b.rule_out.threshold, 0.4);
        assert_eq!((b.rule_out.sensitivity, b.rule_out.specificity), (1.0, 1.0));
        assert_eq!(b.rule_in.threshold, 0.4);
    }

    #[test]
    fn a_separable_split_has_no_band_and_a_one_class_split_no_thresholds() {
        let scores = [0.1, 0.2, 0.8, 0.9];
        let positive = [false, false, true, true];
        let b = band(&scores, &positive, 0.95, 0.95);
        assert_eq!(b.rule_in.threshold, b.rule_out.threshold);
        assert_eq!((b.rule_out.sensitivity, b.rule_in.specificity), (1.0, 1.0));
        assert!(fit_refer_band(&scores, &[true; 4], vec![], 0.95, 0.95).is_none());
        // Negatives above every positive: rule-in lies above every score.
        let b = band(
            &[0.9, 0.95, 0.1, 0.2],
            &[false, false, true, true],
            0.95,
            0.95,
        );
        assert!(b.rule_in.threshold > 0.95 && b.rule_in.threshold < 0.95 + 1e-12);
        assert_eq!(b.rule_in.specificity, 1.0);
    }
}
