//! Classification metrics on one set of predictions: accuracy with a Wilson 95%
//! interval, the confusion matrix, per-class sensitivity/specificity/precision/F1,
//! one-vs-rest ROC curves with AUC (Hanley-McNeil 95% interval) and macro AUC.
//!
//! Definitions follow scikit-learn (`confusion_matrix`, `precision_recall_fscore_support`
//! with `zero_division=0`, `roc_curve(drop_intermediate=False)`, `roc_auc_score`), and
//! tests/metrics_sklearn.rs checks them against it.

use serde::{Deserialize, Serialize};

/// z for a two-sided 95% interval.
const Z95: f64 = 1.959_963_984_540_054;

/// Metrics of one class against the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub class: String,
    /// Test images whose true class this is.
    pub support: u64,
    /// Recall: TP / (TP + FN); 0 when the class has no examples.
    pub sensitivity: f64,
    /// TN / (TN + FP); 0 when every image is of this class.
    pub specificity: f64,
    /// TP / (TP + FP); 0 when the class is never predicted.
    pub precision: f64,
    /// Harmonic mean of precision and sensitivity; 0 when both are 0.
    pub f1: f64,
}

/// One-vs-rest ROC curve of one class, scored by that class's probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RocCurve {
    pub class: String,
    /// False positive rates, from 0 to 1, one point per distinct threshold.
    pub fpr: Vec<f64>,
    pub tpr: Vec<f64>,
    /// Score thresholds (`>=`), the first is +infinity (written as null in JSON).
    pub thresholds: Vec<f64>,
    /// Area under the curve; None when the class has no positives or no negatives.
    pub auc: Option<f64>,
    /// Hanley-McNeil 95% interval of the AUC, clipped to [0, 1].
    pub auc_ci95: Option<[f64; 2]>,
    pub positives: u64,
    pub negatives: u64,
}

/// Everything computed from one set of predictions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub classes: Vec<String>,
    /// Number of images.
    pub n: u64,
    pub correct: u64,
    pub accuracy: f64,
    /// Wilson score 95% interval of the accuracy.
    pub accuracy_ci95: [f64; 2],
    /// Counts; row = true class, column = predicted class.
    pub confusion: Vec<Vec<u64>>,
    /// Each row divided by its sum (a row of zeros when the class has no examples).
    pub confusion_normalised: Vec<Vec<f64>>,
    pub per_class: Vec<ClassMetrics>,
    pub roc: Vec<RocCurve>,
    /// Unweighted mean of the per-class AUCs that are defined.
    pub macro_auc: Option<f64>,
}

impl Evaluation {
    /// One line for people: "25/60 correct (41.7%, 95% CI 30.1-54.3%), macro AUC 0.721".
    pub fn headline(&self) -> String {
        format!(
            "{}/{} correct ({:.1}%, 95% CI {:.1}-{:.1}%), macro AUC {}",
            self.correct,
            self.n,
            100.0 * self.accuracy,
            100.0 * self.accuracy_ci95[0],
            100.0 * self.accuracy_ci95[1],
            self.macro_auc
                .map_or("n/a".to_string(), |a| format!("{a:.3}"))
        )
    }
}

/// Evaluates predictions. `truth[i]` indexes `classes`; `probs[i]` holds one
/// probability per class; the prediction is the most probable class (first on ties).
pub fn evaluate(classes: &[String], truth: &[usize], probs: &[Vec<f64>]) -> Evaluation {
    let c = classes.len();
    assert_eq!(truth.len(), probs.len(), "one probability row per image");
    assert!(
        probs.iter().all(|p| p.len() == c),
        "one probability per class"
    );
    assert!(truth.iter().all(|&t| t < c), "true class out of range");
    let predicted: Vec<usize> = probs.iter().map(|p| argmax(p)).collect();
    let n = truth.len() as u64;

    let mut confusion = vec![vec![0u64; c]; c];
    for (&t, &p) in truth.iter().zip(&predicted) {
        confusion[t][p] += 1;
    }
    let correct: u64 = (0..c).map(|i| confusion[i][i]).sum();
    let confusion_normalised = confusion
        .iter()
        .map(|row| {
            let s: u64 = row.iter().sum();
            row.iter()
                .map(|&v| if s == 0 { 0.0 } else { v as f64 / s as f64 })
                .collect()
        })
        .collect();

    let per_class = (0..c)
        .map(|k| {
            let tp = confusion[k][k];
            let support: u64 = confusion[k].iter().sum();
            let predicted_k: u64 = (0..c).map(|i| confusion[i][k]).sum();
            let fn_ = support - tp;
            let fp = predicted_k - tp;
            let tn = n - tp - fn_ - fp;
            let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
            let sensitivity = ratio(tp, tp + fn_);
            let precision = ratio(tp, tp + fp);
            let f1 = ratio(2 * tp, 2 * tp + fp + fn_);
            ClassMetrics {
                class: classes[k].clone(),
                support,
                sensitivity,
                specificity: ratio(tn, tn + fp),
                precision,
                f1,
            }
        })
        .collect();

    let roc: Vec<RocCurve> = (0..c)
        .map(|k| {
            let scores: Vec<f64> = probs.iter().map(|p| p[k]).collect();
            let positive: Vec<bool> = truth.iter().map(|&t| t == k).collect();
            roc_curve(&classes[k], &scores, &positive)
        })
        .collect();
    let defined: Vec<f64> = roc.iter().filter_map(|r| r.auc).collect();
    let macro_auc =
        (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64);

    Evaluation {
        classes: classes.to_vec(),
        n,
        correct,
        accuracy: if n == 0 {
            0.0
        } else {
            correct as f64 / n as f64
        },
        accuracy_ci95: wilson_interval(correct, n),
        confusion,
        confusion_normalised,
        per_class,
        roc,
        macro_auc,
    }
}

/// ROC curve with one point per distinct score (scikit-learn's `roc_curve` with
/// `drop_intermediate=False`) and its trapezoidal area.
pub fn roc_curve(class: &str, scores: &[f64], positive: &[bool]) -> RocCurve {
    let positives = positive.iter().filter(|&&p| p).count() as u64;
    let negatives = positive.len() as u64 - positives;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut fpr, mut tpr, mut thresholds) = (vec![0.0], vec![0.0], vec![f64::INFINITY]);
    let (mut tp, mut fp) = (0u64, 0u64);
    for (i, &j) in order.iter().enumerate() {
        if positive[j] {
            tp += 1;
        } else {
            fp += 1;
        }
        let last_of_tie = order
            .get(i + 1)
            .is_none_or(|&next| scores[next] != scores[j]);
        if last_of_tie {
            fpr.push(if negatives == 0 {
                f64::NAN
            } else {
                fp as f64 / negatives as f64
            });
            tpr.push(if positives == 0 {
                f64::NAN
            } else {
                tp as f64 / positives as f64
            });
            thresholds.push(scores[j]);
        }
    }
    let auc = (positives > 0 && negatives > 0).then(|| {
        fpr.windows(2)
            .zip(tpr.windows(2))
            .map(|(x, y)| (x[1] - x[0]) * (y[1] + y[0]) / 2.0)
            .sum::<f64>()
    });
    let auc_ci95 = auc.map(|a| hanley_mcneil(a, positives, negatives));
    RocCurve {
        class: class.to_string(),
        fpr,
        tpr,
        thresholds,
        auc,
        auc_ci95,
        positives,
        negatives,
    }
}

/// Hanley & McNeil (1982) standard error of an AUC, as a normal 95% interval
/// clipped to [0, 1].
fn hanley_mcneil(auc: f64, positives: u64, negatives: u64) -> [f64; 2] {
    let (np, nn) = (positives as f64, negatives as f64);
    let q1 = auc / (2.0 - auc);
    let q2 = 2.0 * auc * auc / (1.0 + auc);
    let var = (auc * (1.0 - auc) + (np - 1.0) * (q1 - auc * auc) + (nn - 1.0) * (q2 - auc * auc))
        / (np * nn);
    let se = var.max(0.0).sqrt();
    [(auc - Z95 * se).max(0.0), (auc + Z95 * se).min(1.0)]
}

/// Wilson score 95% interval of a proportion `k / n` ([0, 1] when n is 0).
pub fn wilson_interval(k: u64, n: u64) -> [f64; 2] {
    if n == 0 {
        return [0.0, 1.0];
    }
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let z2 = Z95 * Z95;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z95 / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    [(centre - half).max(0.0), (centre + half).min(1.0)]
}

fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("c{i}")).collect()
    }

    #[test]
    fn perfect_ranking_has_auc_one_and_random_ties_one_half() {
        let r = roc_curve("a", &[0.9, 0.8, 0.3, 0.1], &[true, true, false, false]);
        assert_eq!(r.auc, Some(1.0));
        let r = roc_curve("a", &[0.5; 4], &[true, false, true, false]);
        assert_eq!(r.auc, Some(0.5));
        assert_eq!(r.fpr, vec![0.0, 1.0]);
        let r = roc_curve("a", &[0.5, 0.4], &[true, true]);
        assert_eq!((r.auc, r.auc_ci95), (None, None));
    }

    #[test]
    fn auc_equals_the_mann_whitney_probability() {
        // AUC = P(score of a positive > score of a negative) + P(tie) / 2.
        let scores = [0.1, 0.4, 0.35, 0.8, 0.4, 0.7, 0.2, 0.9, 0.4];
        let pos = [false, true, false, true, false, true, true, false, true];
        let mut wins = 0.0;
        let mut pairs = 0.0;
        for (i, &si) in scores.iter().enumerate() {
            for (j, &sj) in scores.iter().enumerate() {
                if pos[i] && !pos[j] {
                    pairs += 1.0;
                    wins += if si > sj {
                        1.0
                    } else if si == sj {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        let auc = roc_curve("a", &scores, &pos).auc.unwrap();
        assert!(
            (auc - wins / pairs).abs() < 1e-12,
            "{auc} vs {}",
            wins / pairs
        );
    }

    #[test]
    fn confusion_and_per_class_figures_by_hand() {
        let probs = vec![
            vec![0.7, 0.2, 0.1],
            vec![0.2, 0.7, 0.1],
            vec![0.6, 0.3, 0.1],
            vec![0.1, 0.2, 0.7],
            vec![0.1, 0.8, 0.1],
        ];
        let truth = [0, 1, 1, 2, 2];
        let e = evaluate(&names(3), &truth, &probs);
        assert_eq!(
            e.confusion,
            vec![vec![1, 0, 0], vec![1, 1, 0], vec![0, 1, 1]]
        );
        assert_eq!((e.correct, e.n), (3, 5));
        assert!((e.confusion_normalised[1][0] - 0.5).abs() < 1e-15);
        let c1 = &e.per_class[1];
        assert_eq!(c1.support, 2);
        assert!((c1.sensitivity - 0.5).abs() < 1e-15);
        assert!((c1.precision - 0.5).abs() < 1e-15);
        assert!((c1.specificity - 2.0 / 3.0).abs() < 1e-15);
        assert!((c1.f1 - 0.5).abs() < 1e-15);
    }

    #[test]
    fn wilson_interval_matches_a_published_value() {
        // Newcombe (1998), example: 81/263 -> 0.2553 to 0.3662.
        let [lo, hi] = wilson_interval(81, 263);
        assert!(
            (lo - 0.2553).abs() < 5e-4 && (hi - 0.3662).abs() < 5e-4,
            "{lo} {hi}"
        );
        assert_eq!(wilson_interval(0, 0), [0.0, 1.0]);
    }
}
