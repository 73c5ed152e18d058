//! The scikit-learn reference for evaluation metrics (tools/reference_metrics.py).

use cinflow::report::Evaluation;

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
    let out = super::run_python("tools/reference_metrics.py", &[input.to_str().unwrap()]);
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
