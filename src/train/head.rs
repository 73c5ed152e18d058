//! Trains the linear head with libtorch (tch) on cached pooled features.
//!
//! Two solvers ([`Solver`]): the default fits a multinomial (or, for two
//! classes, binary) logistic regression on every view of every training image
//! with full-batch L-BFGS to convergence, once per L2 strength, and keeps the
//! strength with the lowest validation loss — the head on a frozen backbone is
//! a convex problem, so it is solved rather than annealed. `adam` is the seed
//! project's mini-batch schedule with early stopping.
//!
//! Features are standardised per channel (mean and spread of the training views)
//! for a well-conditioned optimisation, and the standardisation is folded back
//! into the weights afterwards, so the served head still takes raw pooled
//! features and Grad-CAM stays exact: `W' = W / s`, `b' = b - W' m`.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};

use super::hyper::{HyperParams, Solver, TrainDevice};
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
    /// How the L2 strength was chosen (`lbfgs`).
    pub selection: Option<L2Selection>,
}

/// One L2 strength's fit, judged on the validation split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct L2Fit {
    pub l2: f64,
    /// The minimised training objective: mean cross-entropy over every view of
    /// the training images plus l2/2·|W|² (standardised features).
    pub objective: f64,
    /// Mean cross-entropy of the validation images (identity view).
    pub val_loss: f64,
    pub val_accuracy: f64,
    pub iterations: usize,
    /// Why L-BFGS stopped (`gradient`, `no progress`, `max_iter`, `line search`).
    pub stopped: String,
}

/// The L2 strengths tried and the one kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct L2Selection {
    pub chosen: f64,
    pub fits: Vec<L2Fit>,
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

/// Standardised training and validation tensors, and the loss of the task.
struct Problem<'a> {
    data: &'a HeadData<'a>,
    dev: Device,
    /// Number of logits: the classes, or 1 for the binary task.
    rows: usize,
    k: usize,
    val_y: Tensor,
    /// Per-channel mean and spread of the training views.
    mean: Vec<f64>,
    scale: Vec<f64>,
}

impl Problem<'_> {
    /// Standardised features (computed in float64, held as `kind`), as [rows, k].
    fn standardised<'v>(&self, vectors: impl Iterator<Item = &'v [f32]>, kind: Kind) -> Tensor {
        let x: Vec<f64> = vectors
            .flat_map(|v| {
                v.iter()
                    .zip(&self.mean)
                    .zip(&self.scale)
                    .map(|((x, m), s)| (f64::from(*x) - m) / s)
            })
            .collect();
        Tensor::from_slice(&x)
            .view([-1, self.k as i64])
            .to_kind(kind)
            .to_device(self.dev)
    }

    fn targets(&self, labels: &[usize]) -> Tensor {
        match self.data.task {
            Task::Multiclass => {
                let y: Vec<i64> = labels.iter().map(|&y| y as i64).collect();
                Tensor::from_slice(&y).to_device(self.dev)
            }
            // The single logit is the first class (CIN): target 1 for it.
            Task::Binary => {
                let y: Vec<f32> = labels.iter().map(|&y| f32::from(y == 0)).collect();
                Tensor::from_slice(&y).view([-1, 1]).to_device(self.dev)
            }
        }
    }

    /// Mean cross-entropy (softmax, or sigmoid for the binary task).
    fn loss(&self, logits: &Tensor, y: &Tensor) -> Tensor {
        match self.data.task {
            // In the logits' own precision (tch's cross_entropy_for_logits
            // would compute in float32).
            Task::Multiclass => logits.log_softmax(-1, logits.kind()).nll_loss(y),
            Task::Binary => logits.binary_cross_entropy_with_logits::<Tensor>(
                &y.to_kind(logits.kind()),
                None,
                None,
                Reduction::Mean,
            ),
        }
    }

    fn correct(&self, logits: &Tensor, labels: &[usize]) -> usize {
        let pred: Vec<i64> = match self.data.task {
            Task::Multiclass => {
                Vec::try_from(logits.argmax(-1, false).to_device(Device::Cpu)).unwrap_or_default()
            }
            Task::Binary => Vec::<f64>::try_from(
                logits
                    .view([-1])
                    .to_kind(Kind::Double)
                    .to_device(Device::Cpu),
            )
            .unwrap_or_default()
            .into_iter()
            .map(|z| if z >= 0.0 { 0 } else { 1 })
            .collect(),
        };
        pred.iter()
            .zip(labels)
            .filter(|(p, y)| **p as usize == **y)
            .count()
    }

    /// Validation loss and accuracy of the logits `forward` computes from the
    /// standardised validation features `val_x`.
    fn validate(&self, val_x: &Tensor, forward: impl Fn(&Tensor) -> Tensor) -> (f64, f64) {
        tch::no_grad(|| {
            let logits = forward(val_x);
            (
                self.loss(&logits, &self.val_y).double_value(&[]),
                self.correct(&logits, &self.data.val_labels) as f64
                    / self.data.val.len().max(1) as f64,
            )
        })
    }
}

/// Trains the head with the solver of `hp` ([`Solver`]); returns the weights
/// for raw pooled features (standardisation folded in).
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
    let (mean, scale) = standardisation(&data.train, k);
    let rows = match data.task {
        Task::Multiclass => data.classes,
        Task::Binary => 1,
    };
    let mut problem = Problem {
        data,
        dev,
        rows,
        k,
        val_y: Tensor::new(),
        mean: mean.clone(),
        scale: scale.clone(),
    };
    problem.val_y = problem.targets(&data.val_labels);
    let (w, b, curve, selection) = match hp.solver {
        Solver::Adam => {
            let (w, b, curve) = adam(&problem, hp, bar)?;
            (w, b, curve, None)
        }
        Solver::Lbfgs => {
            let (w, b, curve, selection) = lbfgs(&problem, hp, bar)?;
            (w, b, curve, Some(selection))
        }
    };
    let head = fold(rows, k, &w, &b, &mean, &scale);
    Ok(TrainedHead {
        head,
        curve,
        device: format!("{dev:?}"),
        selection,
    })
}

/// The seed's preset: Adam, the step schedule, a random view per image per
/// epoch and early stopping on the validation loss; the weights of the epoch
/// with the lowest validation loss.
fn adam(
    p: &Problem,
    hp: &HyperParams,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<(Vec<f32>, Vec<f32>, TrainingCurve), HeadTrainError> {
    let (data, dev, n) = (p.data, p.dev, p.data.train.len());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(hp.seed ^ 0x5eed_4ead);
    // Every view of every training image, standardised, in float32: [n, 8, k].
    let train_all = p
        .standardised(
            data.train.iter().flat_map(|v| v.iter().map(Vec::as_slice)),
            Kind::Float,
        )
        .view([n as i64, VIEWS as i64, p.k as i64]);
    let val_x = p.standardised(data.val.iter().copied(), Kind::Float);
    let vs = nn::VarStore::new(dev);
    let zero = nn::Init::Const(0.0);
    let linear = nn::linear(
        vs.root(),
        p.k as i64,
        p.rows as i64,
        nn::LinearConfig {
            ws_init: zero,
            bs_init: Some(zero),
            bias: true,
        },
    );
    let mut opt = nn::Adam::default().build(&vs, hp.learning_rate)?;
    if let Some(b) = bar {
        b.set_length(hp.max_epochs as u64);
    }
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
            let loss = p.loss(&logits, &p.targets(&labels));
            correct += p.correct(&logits, &labels);
            loss_sum += loss.double_value(&[]) * batch.len() as f64;
            opt.backward_step(&loss);
        }
        let (val_loss, val_accuracy) = p.validate(&val_x, |x| linear.forward(x));
        epochs.push(EpochRecord {
            epoch,
            lr,
            train_loss: loss_sum / n as f64,
            train_accuracy: correct as f64 / n as f64,
            val_loss,
            val_accuracy,
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
    Ok((
        w,
        b,
        TrainingCurve {
            epochs,
            best_epoch,
            stopped,
        },
    ))
}

/// Full-batch L-BFGS on every view of every training image (float64), once
/// per L2 strength from the strongest to the weakest (each warm-started from
/// the previous solution); keeps the strength with the lowest validation loss.
#[allow(clippy::type_complexity)]
fn lbfgs(
    p: &Problem,
    hp: &HyperParams,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<(Vec<f32>, Vec<f32>, TrainingCurve, L2Selection), HeadTrainError> {
    let (n, k, rows) = (p.data.train.len(), p.k, p.rows);
    let x = p.standardised(
        p.data
            .train
            .iter()
            .flat_map(|views| views.iter().map(Vec::as_slice)),
        Kind::Double,
    );
    debug_assert_eq!(x.size()[0], (n * VIEWS) as i64);
    let labels: Vec<usize> = p
        .data
        .train_labels
        .iter()
        .flat_map(|&y| std::iter::repeat_n(y, VIEWS))
        .collect();
    let y = p.targets(&labels);
    let val_x = p.standardised(p.data.val.iter().copied(), Kind::Double);
    let split = |theta: &Tensor| {
        (
            theta
                .narrow(0, 0, (rows * k) as i64)
                .view([rows as i64, k as i64]),
            theta.narrow(0, (rows * k) as i64, rows as i64),
        )
    };
    let to_tensor = |theta: &[f64]| Tensor::from_slice(theta).to_device(p.dev);
    let mut grid = hp.l2_grid.clone();
    grid.sort_by(|a, b| b.total_cmp(a));
    grid.dedup();
    if let Some(b) = bar {
        b.set_length(grid.len() as u64);
    }
    let mut theta = vec![0f64; rows * k + rows];
    let mut fits = Vec::new();
    let mut best: Option<(f64, f64, Vec<f64>, Vec<EpochRecord>, String)> = None;
    for &l2 in &grid {
        let objective = |theta: &[f64]| -> Result<(f64, Vec<f64>), HeadTrainError> {
            crate::observe::health().progress();
            let t = to_tensor(theta).set_requires_grad(true);
            let (w, b) = split(&t);
            let logits = x.matmul(&w.tr()) + &b;
            let loss = p.loss(&logits, &y) + w.square().sum(Kind::Double) * (l2 / 2.0);
            loss.backward();
            let value = loss.double_value(&[]);
            let grad: Vec<f64> = Vec::try_from(t.grad().to_device(Device::Cpu))?;
            Ok((value, grad))
        };
        let mut records = Vec::new();
        let mut record = |iteration: usize, step: f64, theta: &[f64]| {
            let t = to_tensor(theta);
            let (w, b) = split(&t);
            let forward = |x: &Tensor| x.matmul(&w.tr()) + &b;
            let (train_loss, train_accuracy) = tch::no_grad(|| {
                let logits = forward(&x);
                (
                    p.loss(&logits, &y).double_value(&[]),
                    p.correct(&logits, &labels) as f64 / labels.len().max(1) as f64,
                )
            });
            let (val_loss, val_accuracy) = p.validate(&val_x, forward);
            records.push(EpochRecord {
                epoch: iteration,
                lr: step,
                train_loss,
                train_accuracy,
                val_loss,
                val_accuracy,
            });
        };
        let (solution, iterations, objective, stopped) =
            minimize(objective, theta.clone(), hp.max_iter, &mut record)?;
        let last = records
            .last()
            .cloned()
            .ok_or_else(|| HeadTrainError::Invalid("L-BFGS made no iteration".into()))?;
        if !last.val_loss.is_finite() {
            return Err(HeadTrainError::Invalid(format!(
                "validation loss became {} with l2 {l2}",
                last.val_loss
            )));
        }
        fits.push(L2Fit {
            l2,
            objective,
            val_loss: last.val_loss,
            val_accuracy: last.val_accuracy,
            iterations,
            stopped: stopped.clone(),
        });
        if let Some(b) = bar {
            b.inc(1);
            b.set_message(format!("l2 {l2:e}: val loss {:.4}", last.val_loss));
        }
        if best.as_ref().is_none_or(|b| last.val_loss < b.0) {
            best = Some((last.val_loss, l2, solution.clone(), records, stopped));
        }
        theta = solution;
    }
    let (_, chosen, theta, epochs, stopped) = best.expect("a non-empty grid");
    let w: Vec<f32> = theta[..rows * k].iter().map(|&v| v as f32).collect();
    let b: Vec<f32> = theta[rows * k..].iter().map(|&v| v as f32).collect();
    let best_epoch = epochs.len();
    Ok((
        w,
        b,
        TrainingCurve {
            epochs,
            best_epoch,
            stopped: format!(
                "L-BFGS with l2 {chosen:e} (lowest validation loss of {} strengths): stopped on {stopped} after {best_epoch} iterations",
                grid.len()
            ),
        },
        L2Selection { chosen, fits },
    ))
}

/// Limited-memory BFGS (10 pairs) with a backtracking Armijo line search.
/// Stops when the largest gradient component is below 1e-8, when five
/// iterations in a row lower the objective by less than 1e-14 of its value, after `max_iter`
/// iterations, or when no step along the search direction lowers it.
/// `record(iteration, step, x)` is called after every iteration. Returns the
/// solution, the iterations, the objective there and why it stopped.
fn minimize(
    mut f: impl FnMut(&[f64]) -> Result<(f64, Vec<f64>), HeadTrainError>,
    mut x: Vec<f64>,
    max_iter: usize,
    record: &mut impl FnMut(usize, f64, &[f64]),
) -> Result<(Vec<f64>, usize, f64, String), HeadTrainError> {
    const MEMORY: usize = 10;
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let (mut fx, mut g) = f(&x)?;
    let mut pairs: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> =
        std::collections::VecDeque::new();
    let mut iteration = 0;
    let mut stalled = 0;
    let largest = |g: &[f64]| g.iter().fold(0f64, |m, v| m.max(v.abs()));
    let stopped = loop {
        if largest(&g) <= 1e-8 {
            break "gradient";
        }
        if iteration >= max_iter {
            break "max_iter";
        }
        // Two-loop recursion: d = -H g.
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(pairs.len());
        for (s, y, rho) in pairs.iter().rev() {
            let a = rho * dot(s, &q);
            q.iter_mut().zip(y).for_each(|(qi, yi)| *qi -= a * yi);
            alphas.push(a);
        }
        let gamma = pairs
            .back()
            .map_or(1.0 / dot(&g, &g).sqrt().max(1.0), |(s, y, _)| {
                dot(s, y) / dot(y, y)
            });
        q.iter_mut().for_each(|v| *v *= gamma);
        for ((s, y, rho), a) in pairs.iter().zip(alphas.iter().rev()) {
            let beta = rho * dot(y, &q);
            q.iter_mut()
                .zip(s)
                .for_each(|(qi, si)| *qi += (a - beta) * si);
        }
        let mut d: Vec<f64> = q.iter().map(|v| -v).collect();
        let mut slope = dot(&g, &d);
        if slope >= 0.0 {
            pairs.clear();
            d = g.iter().map(|v| -v).collect();
            slope = -dot(&g, &g);
        }
        let mut step = 1.0;
        let (x_new, f_new, g_new) = loop {
            let xn: Vec<f64> = x.iter().zip(&d).map(|(xi, di)| xi + step * di).collect();
            let (fv, gv) = f(&xn)?;
            if fv.is_finite() && fv <= fx + 1e-4 * step * slope {
                break (xn, fv, gv);
            }
            step *= 0.5;
            if step < 1e-20 {
                let why = format!("line search (largest gradient {:.1e})", largest(&g));
                return Ok((x, iteration, fx, why));
            }
        };
        iteration += 1;
        let s: Vec<f64> = x_new.iter().zip(&x).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = g_new.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        if sy > 1e-12 * dot(&y, &y).sqrt() * dot(&s, &s).sqrt() {
            pairs.push_back((s, y, 1.0 / sy));
            if pairs.len() > MEMORY {
                pairs.pop_front();
            }
        }
        let decrease = (fx - f_new) / fx.abs().max(f_new.abs()).max(1.0);
        x = x_new;
        fx = f_new;
        g = g_new;
        record(iteration, step, &x);
        stalled = if decrease <= 1e-14 { stalled + 1 } else { 0 };
        if stalled >= 5 {
            break "no progress";
        }
    };
    if iteration == 0 {
        record(0, 0.0, &x);
    }
    Ok((
        x,
        iteration,
        fx,
        format!("{stopped} (largest gradient {:.1e})", largest(&g)),
    ))
}

/// Per-channel mean and spread over every view of the training images (two
/// passes, so a channel with a large mean and a small spread keeps its
/// precision); channels that never vary get spread 1 (their weight cannot
/// matter).
fn standardisation(train: &[&[Vec<f32>]], k: usize) -> (Vec<f64>, Vec<f64>) {
    let views = || train.iter().flat_map(|views| views.iter());
    let count = views().count() as f64;
    let mut mean = vec![0f64; k];
    for v in views() {
        for (m, x) in mean.iter_mut().zip(v) {
            *m += f64::from(*x);
        }
    }
    mean.iter_mut().for_each(|m| *m /= count);
    let mut var = vec![0f64; k];
    for v in views() {
        for ((s, x), m) in var.iter_mut().zip(v).zip(&mean) {
            *s += (f64::from(*x) - m).powi(2);
        }
    }
    let scale = var
        .iter()
        .zip(&mean)
        .map(|(s, m)| {
            let sd = (s / count).sqrt();
            if sd > 1e-8 * (1.0 + m.abs()) {
                sd
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
        for solver in [Solver::Adam, Solver::Lbfgs] {
            let hp = HyperParams {
                solver,
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
