//! The evaluation metrics against scikit-learn on the same predictions: AUC to
//! 1e-9, the confusion matrix exactly, the other per-class figures to 1e-12.

mod common;

use rand::{Rng, SeedableRng};

use cinflow::report::{evaluate, Evaluation};

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

/// Compares cinflow's evaluation with tools/reference_metrics.py on the same data.
pub fn assert_matches_sklearn(e: &Evaluation, truth: &[usize], probs: &[Vec<f64>]) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("preds.json");
    std::fs::write(
        &input,
        serde_json::to_vec(&serde_json::json!({
            "classes": e.classes, "truth": truth, "probs": probs,
        }))
        .unwrap(),
    )
    .unwrap();
    let out = common::run_python("tools/reference_metrics.py", &[input.to_str().unwrap()]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    assert_eq!(
        serde_json::to_value(&e.confusion).unwrap(),
        r["confusion"],
        "confusion matrix"
    );
    assert!((e.accuracy - f(&r["accuracy"])).abs() < 1e-12);
    for (k, c) in e.per_class.iter().enumerate() {
        for (name, ours) in [
            ("precision", c.precision),
            ("sensitivity", c.sensitivity),
            ("f1", c.f1),
            ("specificity", c.specificity),
        ] {
            let theirs = f(&r[name][k]);
            assert!(
                (ours - theirs).abs() < 1e-12,
                "{name} of {}: {ours} vs {theirs}",
                c.class
            );
        }
        assert_eq!(c.support, r["support"][k].as_u64().unwrap());
        match (e.roc[k].auc, r["auc"][k].as_f64()) {
            (Some(a), Some(b)) => {
                assert!((a - b).abs() < 1e-9, "AUC of {}: {a} vs {b}", c.class);
                let curve = &r["roc"][k];
                let fpr: Vec<f64> = serde_json::from_value(curve["fpr"].clone()).unwrap();
                let tpr: Vec<f64> = serde_json::from_value(curve["tpr"].clone()).unwrap();
                assert_eq!(fpr.len(), e.roc[k].fpr.len(), "ROC points of {}", c.class);
                for (a, b) in e.roc[k]
                    .fpr
                    .iter()
                    .zip(&fpr)
                    .chain(e.roc[k].tpr.iter().zip(&tpr))
                {
                    assert!((a - b).abs() < 1e-12);
                }
            }
            (None, None) => {}
            (a, b) => panic!("AUC of {}: {a:?} vs {b:?}", c.class),
        }
    }
    let (a, b) = (e.macro_auc.unwrap(), f(&r["macro_auc"]));
    assert!((a - b).abs() < 1e-9, "macro AUC {a} vs {b}");
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
