//! The evaluation metrics against scikit-learn on the same predictions: AUC to
//! 1e-9, the confusion matrix exactly, the other per-class figures to 1e-12.

mod common;

use rand::{Rng, SeedableRng};

use cinflow::report::evaluate;
use common::sklearn::assert_matches_sklearn;

/// Random probabilities that lean towards the true class, rounded to 2 decimals
/// so scores tie (the hard case for ROC code), each row summing to 1.
fn predictions(n: usize, c: usize, seed: u64) -> (Vec<usize>, Vec<Vec<f64>>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let truth: Vec<usize> = (0..n).map(|_| rng.random_range(0..c)).collect();
    let probs = truth
        .iter()
        .map(|&t| {
            let mut p: Vec<f64> = (0..c)
                .map(|k| rng.random::<f64>() + if k == t { 0.6 } else { 0.0 })
                .collect();
            let s: f64 = p.iter().sum();
            p.iter_mut()
                .for_each(|v| *v = (*v / s * 100.0).round() / 100.0);
            // Rows must sum to 1 for scikit-learn's multiclass AUC.
            let rest: f64 = p[..c - 1].iter().sum();
            p[c - 1] = 1.0 - rest;
            p
        })
        .collect();
    (truth, probs)
}

#[test]
fn metrics_match_scikit_learn_for_4_3_and_2_classes() {
    for (c, n, seed) in [(4, 97, 1), (3, 60, 2), (2, 41, 3), (4, 25, 4)] {
        let classes: Vec<String> = (0..c).map(|k| format!("class{k}")).collect();
        let (truth, probs) = predictions(n, c, seed);
        let e = evaluate(&classes, &truth, &probs);
        assert_matches_sklearn(&e, &truth, &probs);
    }
}
