//! Trains the linear head with libtorch (tch) on cached pooled features.
//!
//! Features are standardised per channel (mean and spread of the training views)
//! for a well-conditioned optimisation, and the standardisation is folded back
//! into the weights afterwards, so the served head still takes raw pooled
//! features and Grad-CAM stays exact: `W' = W / s`, `b' = b - W' m`.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Reduction, Tensor};

use super::hyper::{HyperParams, TrainDevice};
use super::views::VIEWS;
use crate::model::{Head, Task};
use crate::report::{EpochRecord, TrainingCurve};

/// Why head training failed.
#[derive(Debug, thiserror::Error)]
pub enum HeadTrainError {
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("--train-device cuda was asked for, but libtorch sees no CUDA device")]
    NoCuda,
    #[error("{0}")]
    Invalid(String),
}

/// Labelled examples: every view of each training image, one view of each validation image.
pub struct HeadData<'a> {
    pub task: Task,
    pub classes: usize,
    /// Per training image, its 8 views' pooled features.
    pub train: Vec<&'a [Vec<f32>]>,
    pub train_labels: Vec<usize>,
    /// Per validation image, the identity view's pooled features.
    pub val: Vec<&'a [f32]>,
    pub val_labels: Vec<usize>,
}

/// The trained head (for raw pooled features) and its curve.
pub struct TrainedHead {
    pub head: Head,
    pub curve: TrainingCurve,
    pub device: String,
}

/// Picks the device for `choice`.
pub fn device(choice: TrainDevice) -> Result<Device, HeadTrainError> {
    match choice {
        TrainDevice::Cpu => Ok(Device::Cpu),
        TrainDevice::Auto => Ok(Device::cuda_if_available()),
        TrainDevice::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        TrainDevice::Cuda => Err(HeadTrainError::NoCuda),
    }
}

/// Trains the head with Adam, the step schedule, a random view per image per
/// epoch and early stopping on the validation loss; returns the weights of the
/// epoch with the lowest validation loss.
pub fn train_head(
    data: &HeadData,
    hp: &HyperParams,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<TrainedHead, HeadTrainError> {
    if let Some(p) = hp.problems() {
        return Err(HeadTrainError::Invalid(p));
    }
    let k = data
        .train
        .first()
        .map(|v| v[0].len())
        .ok_or_else(|| HeadTrainError::Invalid("no training images".into()))?;
    let dev = device(hp.train_device)?;
    tch::manual_seed(hp.seed as i64);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(hp.seed ^ 0x5eed_4ead);
    let (mean, scale) = standardisation(&data.train, k);
    let standardise = |x: &[f32]| -> Vec<f32> {
        x.iter()
            .zip(&mean)
            .zip(&scale)
            .map(|((v, m), s)| ((f64::from(*v) - m) / s) as f32)
            .collect()
    };
    // All 8 views of the training images, standardised once: [n, 8, k].
    let n = data.train.len();
    let train_all: Vec<f32> = data
        .train
        .iter()
        .flat_map(|views| views.iter().flat_map(|v| standardise(v)))
        .collect();
    let train_all = Tensor::from_slice(&train_all)
        .view([n as i64, VIEWS as i64, k as i64])
        .to_device(dev);
    let val_x: Vec<f32> = data.val.iter().flat_map(|v| standardise(v)).collect();
    let val_x = Tensor::from_slice(&val_x)
        .view([data.val.len() as i64, k as i64])
        .to_device(dev);
    let rows = match data.task {
        Task::Multiclass => data.classes,
        Task::Binary => 1,
    };
    let targets = |labels: &[usize]| -> Tensor {
        match data.task {
            Task::Multiclass => {
                let y: Vec<i64> = labels.iter().map(|&y| y as i64).collect();
                Tensor::from_slice(&y).to_device(dev)
            }
            // The single logit is the first class (CIN): target 1 for it.
            Task::Binary => {
                let y: Vec<f32> = labels.iter().map(|&y| f32::from(y == 0)).collect();
                Tensor::from_slice(&y).view([-1, 1]).to_device(dev)
            }
        }
    };
    let val_y = targets(&data.val_labels);

    let vs = nn::VarStore::new(dev);
    let zero = nn::Init::Const(0.0);
    let linear = nn::linear(
        vs.root(),
        k as i64,
        rows as i64,
        nn::LinearConfig {
            ws_init: zero,
            bs_init: Some(zero),
            bias: true,
        },
    );
    let mut opt = nn::Adam::default().build(&vs, hp.learning_rate)?;
    let loss_of = |logits: &Tensor, y: &Tensor| -> Tensor {
        match data.task {
            Task::Multiclass => logits.cross_entropy_for_logits(y),
            Task::Binary => {
                logits.binary_cross_entropy_with_logits::<Tensor>(y, None, None, Reduction::Mean)
            }
        }
    };
    let correct_of = |logits: &Tensor, labels: &[usize]| -> usize {
        let pred: Vec<i64> = match data.task {
            Task::Multiclass => {
                Vec::try_from(logits.argmax(-1, false).to_device(Device::Cpu)).unwrap_or_default()
            }
            Task::Binary => Vec::<f32>::try_from(logits.view([-1]).to_device(Device::Cpu))
                .unwrap_or_default()
                .into_iter()
                .map(|z| if z >= 0.0 { 0 } else { 1 })
                .collect(),
        };
        pred.iter()
            .zip(labels)
            .filter(|(p, y)| **p as usize == **y)
            .count()
    };

    let mut epochs = Vec::new();
    let mut best: Option<(f64, usize, Tensor, Tensor)> = None;
    let mut since_best = 0usize;
    let mut stopped = format!("max epochs ({}) reached", hp.max_epochs);
    for epoch in 1..=hp.max_epochs {
        crate::observe::health().progress();
        let lr = hp.lr_at(epoch);
        opt.set_lr(lr);
        let view: Vec<i64> = (0..n).map(|_| rng.random_range(0..VIEWS as i64)).collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        let (mut loss_sum, mut correct) = (0.0, 0usize);
        for batch in order.chunks(hp.batch_size) {
            let idx: Vec<i64> = batch.iter().map(|&i| i as i64).collect();
            let vidx: Vec<i64> = batch.iter().map(|&i| view[i]).collect();
            let idx = Tensor::from_slice(&idx).to_device(dev);
            let vidx = Tensor::from_slice(&vidx).to_device(dev);
            let x = train_all.index(&[Some(idx), Some(vidx)]);
            let labels: Vec<usize> = batch.iter().map(|&i| data.train_labels[i]).collect();
            let logits = linear.forward(&x);
            let loss = loss_of(&logits, &targets(&labels));
            correct += correct_of(&logits, &labels);
            loss_sum += loss.double_value(&[]) * batch.len() as f64;
            opt.backward_step(&loss);
        }
        let (val_loss, val_correct) = tch::no_grad(|| {
            let logits = linear.forward(&val_x);
            (
                loss_of(&logits, &val_y).double_value(&[]),
                correct_of(&logits, &data.val_labels),
            )
        });
        epochs.push(EpochRecord {
            epoch,
            lr,
            train_loss: loss_sum / n as f64,
            train_accuracy: correct as f64 / n as f64,
            val_loss,
            val_accuracy: val_correct as f64 / data.val.len().max(1) as f64,
        });
        if !val_loss.is_finite() {
            return Err(HeadTrainError::Invalid(format!(
                "validation loss became {val_loss} at epoch {epoch}; lower the learning rate"
            )));
        }
        if best.as_ref().is_none_or(|b| val_loss < b.0) {
            best = Some((
                val_loss,
                epoch,
                linear.ws.copy(),
                linear.bs.as_ref().expect("bias").copy(),
            ));
            since_best = 0;
        } else if epoch > hp.early_stopping_start {
            since_best += 1;
        }
        if let Some(b) = bar {
            b.inc(1);
            b.set_message(format!("val loss {val_loss:.4}"));
        }
        if since_best >= hp.patience && epoch >= hp.early_stopping_start {
            stopped = format!(
                "early stopping at epoch {epoch}: no lower validation loss for {} epochs after epoch {}",
                hp.patience, hp.early_stopping_start
            );
            break;
        }
    }
    let (_, best_epoch, w, b) = best.expect("at least one epoch");
    let w: Vec<f32> = Vec::try_from(w.to_device(Device::Cpu).view([-1]))?;
    let b: Vec<f32> = Vec::try_from(b.to_device(Device::Cpu))?;
    let head = fold(rows, k, &w, &b, &mean, &scale);
    Ok(TrainedHead {
        head,
        curve: TrainingCurve {
            epochs,
            best_epoch,
            stopped,
        },
        device: format!("{dev:?}"),
    })
}

/// Per-channel mean and spread over every view of the training images; channels
/// that never vary get spread 1 (their weight cannot matter).
fn standardisation(train: &[&[Vec<f32>]], k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut sum = vec![0f64; k];
    let mut sq = vec![0f64; k];
    let mut count = 0f64;
    for views in train {
        for v in views.iter() {
            for (j, x) in v.iter().enumerate() {
                sum[j] += f64::from(*x);
                sq[j] += f64::from(*x) * f64::from(*x);
            }
            count += 1.0;
        }
    }
    let mean: Vec<f64> = sum.iter().map(|s| s / count).collect();
    let scale = sq
        .iter()
        .zip(&mean)
        .map(|(q, m)| {
            let var = (q / count - m * m).max(0.0);
            if var.sqrt() > 1e-8 * (1.0 + m.abs()) {
                var.sqrt()
            } else {
                1.0
            }
        })
        .collect();
    (mean, scale)
}

/// Folds standardisation into the weights: `W' = W / s`, `b' = b - W' m`.
fn fold(rows: usize, k: usize, w: &[f32], b: &[f32], mean: &[f64], scale: &[f64]) -> Head {
    let mut weight = Vec::with_capacity(rows * k);
    let mut bias = Vec::with_capacity(rows);
    for r in 0..rows {
        let mut shift = 0f64;
        for j in 0..k {
            let wj = f64::from(w[r * k + j]) / scale[j];
            shift += wj * mean[j];
            weight.push(wj as f32);
        }
        bias.push((f64::from(b[r]) - shift) as f32);
    }
    Head {
        rows,
        channels: k,
        weight,
        bias,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two well separated Gaussian classes in 6 channels with an offset and scale,
    /// 8 jittered views each.
    fn toy(n: usize, seed: u64) -> (Vec<Vec<Vec<f32>>>, Vec<usize>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for i in 0..n {
            let y = i % 2;
            let views = (0..VIEWS)
                .map(|_| {
                    (0..6)
                        .map(|j| {
                            let signal = if j < 2 && y == 1 { 1.5 } else { 0.0 };
                            100.0 + 10.0 * (signal + rng.random_range(-1.0f32..1.0))
                        })
                        .collect()
                })
                .collect();
            xs.push(views);
            ys.push(y);
        }
        (xs, ys)
    }

    fn data<'a>(task: Task, x: &'a [Vec<Vec<f32>>], y: &[usize]) -> HeadData<'a> {
        let split = x.len() * 3 / 4;
        HeadData {
            task,
            classes: 2,
            train: x[..split].iter().map(|v| v.as_slice()).collect(),
            train_labels: y[..split].to_vec(),
            val: x[split..].iter().map(|v| v[0].as_slice()).collect(),
            val_labels: y[split..].to_vec(),
        }
    }

    #[test]
    fn learns_separable_classes_deterministically_and_folds_exactly() {
        let (x, y) = toy(64, 1);
        let hp = HyperParams {
            learning_rate: 1e-2,
            max_epochs: 30,
            train_device: TrainDevice::Cpu,
            ..Default::default()
        };
        for task in [Task::Multiclass, Task::Binary] {
            let d = data(task, &x, &y);
            let a = train_head(&d, &hp, None).unwrap();
            let b = train_head(&d, &hp, None).unwrap();
            assert_eq!(a.head, b.head, "same seed, same head ({task:?})");
            assert_eq!(a.curve, b.curve);
            let last = a.curve.epochs.last().unwrap();
            assert!(last.val_accuracy > 0.9, "{task:?}: {last:?}");
            assert!(a.curve.epochs[0].train_loss > last.train_loss);
        }
    }

    #[test]
    fn folding_reproduces_the_standardised_logits() {
        let (mean, scale) = (vec![3.0, -2.0, 10.0], vec![2.0, 0.5, 4.0]);
        let (w, b) = (vec![0.3f32, -1.2, 0.7, 1.0, 0.0, -0.5], vec![0.1f32, -0.4]);
        let head = fold(2, 3, &w, &b, &mean, &scale);
        let x = [5.0f32, -1.0, 2.0];
        let logits = head.logits(&x);
        for r in 0..2 {
            let z: f64 = (0..3)
                .map(|j| f64::from(w[r * 3 + j]) * (f64::from(x[j]) - mean[j]) / scale[j])
                .sum::<f64>()
                + f64::from(b[r]);
            assert!(
                (f64::from(logits[r]) - z).abs() < 1e-5,
                "{} vs {z}",
                logits[r]
            );
        }
    }
}
