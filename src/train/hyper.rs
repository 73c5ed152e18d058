//! Hyper-parameters of head training. The default solver is full-batch L-BFGS
//! with an L2 strength chosen on the validation split (linear probing of a
//! frozen backbone: a convex problem, solved to convergence); `--solver adam`
//! is the seed project's preset (mini-batch Adam, 1e-4 divided by 10 every 10
//! epochs; docs/retraining.md). Every value can be overridden.

use serde::{Deserialize, Serialize};

/// Where the head is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TrainDevice {
    /// CUDA when libtorch sees a GPU, CPU otherwise.
    Auto,
    Cpu,
    Cuda,
}

/// How the head's weights are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Solver {
    /// Full-batch L-BFGS on every view of the training images, for each L2
    /// strength of --l2; the one with the lowest validation loss is kept.
    Lbfgs,
    /// The seed's preset: mini-batch Adam with the step schedule (--lr,
    /// --lr-step-epochs, --lr-factor, --min-lr) and early stopping.
    Adam,
}

/// Optimiser, schedule and stopping rule of head training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct HyperParams {
    /// Head solver: `lbfgs` (converges; L2 chosen on validation) or `adam`
    /// (the seed project's schedule).
    #[arg(long, env = "CINFLOW_TRAIN_SOLVER", default_value = "lbfgs")]
    #[serde(default = "default_solver")]
    pub solver: Solver,
    /// L2 strengths tried by `lbfgs` (penalty l2/2·|W|² on standardised
    /// features, added to the mean cross-entropy), comma-separated.
    #[arg(
        long = "l2",
        env = "CINFLOW_TRAIN_L2",
        value_delimiter = ',',
        default_values_t = default_l2_grid()
    )]
    #[serde(default = "default_l2_grid")]
    pub l2_grid: Vec<f64>,
    /// Most L-BFGS iterations for one L2 strength.
    #[arg(long, env = "CINFLOW_TRAIN_MAX_ITER", default_value_t = 2000)]
    #[serde(default = "default_max_iter")]
    pub max_iter: usize,
    /// Adam learning rate of the first epochs.
    #[arg(long = "lr", env = "CINFLOW_TRAIN_LR", default_value_t = 1e-4)]
    pub learning_rate: f64,
    /// The learning rate is multiplied by --lr-factor every this many epochs...
    #[arg(long, env = "CINFLOW_TRAIN_LR_STEP_EPOCHS", default_value_t = 10)]
    pub lr_step_epochs: usize,
    /// ...by this factor...
    #[arg(long, env = "CINFLOW_TRAIN_LR_FACTOR", default_value_t = 0.1)]
    pub lr_factor: f64,
    /// ...down to this floor.
    #[arg(long, env = "CINFLOW_TRAIN_MIN_LR", default_value_t = 1e-7)]
    pub min_lr: f64,
    /// Images per optimiser step.
    #[arg(
        long = "train-batch-size",
        env = "CINFLOW_TRAIN_BATCH_SIZE",
        default_value_t = 16
    )]
    pub batch_size: usize,
    /// Hard limit on epochs (early stopping normally ends training first).
    #[arg(long, env = "CINFLOW_TRAIN_MAX_EPOCHS", default_value_t = 300)]
    pub max_epochs: usize,
    /// Early stopping watches the validation loss from this epoch on...
    #[arg(long, env = "CINFLOW_TRAIN_EARLY_STOPPING_START", default_value_t = 50)]
    pub early_stopping_start: usize,
    /// ...and stops after this many epochs without a new lowest validation loss.
    #[arg(long, env = "CINFLOW_TRAIN_PATIENCE", default_value_t = 50)]
    pub patience: usize,
    /// Seed of the split, the view drawn per image per epoch and the batch order.
    #[arg(long, env = "CINFLOW_TRAIN_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Device for head training.
    #[arg(long, env = "CINFLOW_TRAIN_DEVICE", default_value = "auto")]
    pub train_device: TrainDevice,
    /// CIN2+ sensitivity on the validation split that the rule-out threshold
    /// keeps (below it an image is `CIN2+ unlikely`); 4- and 3-class models.
    #[arg(long, env = "CINFLOW_TRAIN_REFER_SENSITIVITY", default_value_t = 0.95)]
    #[serde(default = "default_refer_target")]
    pub refer_sensitivity: f64,
    /// CIN2+ specificity on the validation split that the rule-in threshold
    /// keeps (at or above it an image is `CIN2+ likely`).
    #[arg(long, env = "CINFLOW_TRAIN_REFER_SPECIFICITY", default_value_t = 0.95)]
    #[serde(default = "default_refer_target")]
    pub refer_specificity: f64,
}

fn default_refer_target() -> f64 {
    0.95
}

fn default_solver() -> Solver {
    Solver::Lbfgs
}

fn default_l2_grid() -> Vec<f64> {
    vec![1e-4, 1e-3, 1e-2, 1e-1, 1.0]
}

fn default_max_iter() -> usize {
    2000
}

impl Default for HyperParams {
    fn default() -> Self {
        HyperParams {
            solver: default_solver(),
            l2_grid: default_l2_grid(),
            max_iter: default_max_iter(),
            learning_rate: 1e-4,
            lr_step_epochs: 10,
            lr_factor: 0.1,
            min_lr: 1e-7,
            batch_size: 16,
            max_epochs: 300,
            early_stopping_start: 50,
            patience: 50,
            seed: 0,
            train_device: TrainDevice::Auto,
            refer_sensitivity: default_refer_target(),
            refer_specificity: default_refer_target(),
        }
    }
}

impl HyperParams {
    /// Learning rate of 1-based `epoch`: step decay with a floor.
    pub fn lr_at(&self, epoch: usize) -> f64 {
        let steps = (epoch.saturating_sub(1) / self.lr_step_epochs.max(1)) as i32;
        (self.learning_rate * self.lr_factor.powi(steps)).max(self.min_lr)
    }

    /// Names the first value out of its range (field name as in a training
    /// message's `hyper_parameters`). The bounds keep one job from asking for
    /// a week of epochs or a batch that cannot fit in memory.
    pub fn problems(&self) -> Option<String> {
        let real = |name: &str, v: f64, lo: f64, hi: f64, lo_open: bool| {
            let above = if lo_open { v > lo } else { v >= lo };
            (!(above && v <= hi && v.is_finite())).then(|| {
                let open = if lo_open { "(" } else { "[" };
                format!("{name} = {v} is out of range {open}{lo}, {hi}]")
            })
        };
        let count = |name: &str, v: usize, lo: usize, hi: usize| {
            (!(lo..=hi).contains(&v)).then(|| format!("{name} = {v} is out of range [{lo}, {hi}]"))
        };
        let grid = || {
            if self.l2_grid.is_empty() || self.l2_grid.len() > 32 {
                return Some(format!(
                    "l2_grid has {} values; give 1 to 32",
                    self.l2_grid.len()
                ));
            }
            self.l2_grid
                .iter()
                .find_map(|&l| real("l2_grid value", l, 0.0, 1e6, false))
        };
        grid()
            .or_else(|| count("max_iter", self.max_iter, 1, MAX_EPOCHS))
            .or_else(|| real("learning_rate", self.learning_rate, 0.0, 1.0, true))
            .or_else(|| real("lr_factor", self.lr_factor, 0.0, 1.0, true))
            .or_else(|| real("min_lr", self.min_lr, 0.0, self.learning_rate, false))
            .or_else(|| count("batch_size", self.batch_size, 1, MAX_BATCH_SIZE))
            .or_else(|| count("max_epochs", self.max_epochs, 1, MAX_EPOCHS))
            .or_else(|| count("lr_step_epochs", self.lr_step_epochs, 1, MAX_EPOCHS))
            .or_else(|| {
                count(
                    "early_stopping_start",
                    self.early_stopping_start,
                    0,
                    MAX_EPOCHS,
                )
            })
            .or_else(|| count("patience", self.patience, 1, MAX_EPOCHS))
            .or_else(|| real("refer_sensitivity", self.refer_sensitivity, 0.5, 1.0, false))
            .or_else(|| real("refer_specificity", self.refer_specificity, 0.5, 1.0, false))
    }
}

/// Most images per optimiser step.
pub const MAX_BATCH_SIZE: usize = 4096;
/// Most epochs (and the largest epoch-valued setting).
pub const MAX_EPOCHS: usize = 10_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_schedule_steps_every_ten_epochs_down_to_1e_7() {
        let hp = HyperParams {
            solver: Solver::Adam,
            ..HyperParams::default()
        };
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b;
        assert!(close(hp.lr_at(1), 1e-4) && close(hp.lr_at(10), 1e-4));
        assert!(close(hp.lr_at(11), 1e-5) && close(hp.lr_at(21), 1e-6));
        assert!(close(hp.lr_at(31), 1e-7) && close(hp.lr_at(200), 1e-7));
    }

    #[test]
    fn out_of_range_values_are_named() {
        assert_eq!(HyperParams::default().problems(), None);
        let bad = |f: &dyn Fn(&mut HyperParams)| {
            let mut hp = HyperParams::default();
            f(&mut hp);
            hp.problems().unwrap()
        };
        assert!(bad(&|h| h.learning_rate = 0.0).starts_with("learning_rate = 0"));
        assert!(bad(&|h| h.learning_rate = f64::NAN).starts_with("learning_rate"));
        assert!(bad(&|h| h.learning_rate = 5.0).contains("(0, 1]"));
        assert!(bad(&|h| h.batch_size = 0).starts_with("batch_size"));
        assert!(bad(&|h| h.batch_size = 100_000).starts_with("batch_size"));
        assert!(bad(&|h| h.max_epochs = 1_000_000).starts_with("max_epochs"));
        assert!(bad(&|h| h.min_lr = 1.0).starts_with("min_lr"));
        assert!(bad(&|h| h.patience = 0).starts_with("patience"));
        assert!(bad(&|h| h.l2_grid = vec![]).starts_with("l2_grid"));
        assert!(bad(&|h| h.l2_grid = vec![0.1, -1.0]).starts_with("l2_grid value = -1"));
        assert!(bad(&|h| h.max_iter = 0).starts_with("max_iter"));
        assert!(bad(&|h| h.refer_sensitivity = 1.5).starts_with("refer_sensitivity"));
        assert!(bad(&|h| h.refer_specificity = 0.2).starts_with("refer_specificity"));
    }
}
