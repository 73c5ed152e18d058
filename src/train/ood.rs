//! Fitting the out-of-distribution model ([`crate::model::ood`]): mean and
//! Ledoit-Wolf shrunk covariance of the training images' pooled features
//! (identity view), in float64 with libtorch, as scikit-learn's
//! `LedoitWolf().fit(X)` computes them; the threshold is a percentile of the
//! validation images' distances. tests/train.rs checks the shrinkage, the
//! threshold and the served distances against scikit-learn.

use tch::{Device, Kind, Tensor};

use crate::model::{OodModel, OodSpec};
use crate::report::levels::percentile;

/// Percentile of the validation distances used as the threshold.
pub const OOD_PERCENTILE: f64 = 99.0;

fn matrix(rows: &[&[f32]]) -> Tensor {
    let p = rows[0].len();
    let flat: Vec<f64> = rows
        .iter()
        .flat_map(|r| r.iter().map(|v| f64::from(*v)))
        .collect();
    Tensor::from_slice(&flat)
        .view([rows.len() as i64, p as i64])
        .to_device(Device::Cpu)
}

/// The mean, Ledoit-Wolf covariance and its inverse of `train`, and the
/// threshold from `validation`'s distances. None with fewer than two
/// training images.
pub fn fit_ood(train: &[&[f32]], validation: &[&[f32]]) -> Option<(OodModel, OodSpec)> {
    if train.len() < 2 || validation.is_empty() {
        return None;
    }
    let _guard = tch::no_grad_guard();
    let x = matrix(train);
    let (n, p) = (train.len() as f64, train[0].len() as f64);
    let mean = x.mean_dim(0, false, Kind::Double);
    let xc = &x - &mean;
    let emp_cov = xc.tr().matmul(&xc) / n;
    // scikit-learn's ledoit_wolf_shrinkage (assume_centered=False).
    let x2 = xc.square();
    let trace = f64::try_from(emp_cov.trace()).ok()?;
    let mu = trace / p;
    let beta_ = f64::try_from(x2.tr().matmul(&x2).sum(Kind::Double)).ok()?;
    let delta_ = f64::try_from(xc.tr().matmul(&xc).square().sum(Kind::Double)).ok()? / (n * n);
    let beta = (beta_ / n - delta_) / (p * n);
    let delta = (delta_ - 2.0 * mu * trace + p * mu * mu) / p;
    let beta = beta.min(delta);
    let shrinkage = if beta == 0.0 { 0.0 } else { beta / delta };
    let eye = Tensor::eye(p as i64, (Kind::Double, Device::Cpu));
    let cov = &emp_cov * (1.0 - shrinkage) + eye * (shrinkage * mu);
    let precision = Tensor::linalg_inv(&cov);
    let to_f32 = |t: &Tensor| -> Option<Vec<f32>> {
        Vec::<f64>::try_from(t.reshape([-1]))
            .ok()
            .map(|v| v.into_iter().map(|x| x as f32).collect())
    };
    let model = OodModel {
        channels: train[0].len(),
        mean: to_f32(&mean)?,
        precision: to_f32(&precision)?,
    };
    if model.precision.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let distances: Vec<f64> = validation.iter().map(|v| model.distance(v)).collect();
    let spec = OodSpec {
        threshold: percentile(&distances, OOD_PERCENTILE),
        percentile: OOD_PERCENTILE,
        fitted_on: "train".into(),
        images: train.len(),
        threshold_from: "validation".into(),
        shrinkage,
    };
    Some((model, spec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn far_points_are_far_and_the_threshold_is_a_validation_percentile() {
        // Two channels, the second ten times as spread as the first.
        let train: Vec<Vec<f32>> = (0..200)
            .map(|i| {
                let a = ((i * 37) % 101) as f32 / 101.0 - 0.5;
                let b = ((i * 53) % 97) as f32 / 97.0 - 0.5;
                vec![a, 10.0 * b]
            })
            .collect();
        let rows: Vec<&[f32]> = train.iter().map(Vec::as_slice).collect();
        let (model, spec) = fit_ood(&rows, &rows[..100]).unwrap();
        assert!(spec.shrinkage >= 0.0 && spec.shrinkage <= 1.0);
        // A step of 1 along the tight channel is farther than along the wide one.
        let centre = [model.mean[0], model.mean[1]];
        let tight = model.distance(&[centre[0] + 1.0, centre[1]]);
        let wide = model.distance(&[centre[0], centre[1] + 1.0]);
        assert!(tight > 5.0 * wide, "{tight} vs {wide}");
        assert!(model.distance(&[centre[0] + 3.0, centre[1]]) > spec.threshold);
        assert_eq!(percentile(&[3.0, 1.0, 2.0, 4.0], 50.0), 2.5);
    }
}
