//! Hyper-parameters of head training. The defaults are the seed project's
//! (README.md, "Retraining": the seed preset); every one can be overridden.

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

/// Optimiser, schedule and stopping rule of head training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct HyperParams {
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
}

impl Default for HyperParams {
    fn default() -> Self {
        HyperParams {
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
        }
    }
}

impl HyperParams {
    /// Learning rate of 1-based `epoch`: step decay with a floor.
    pub fn lr_at(&self, epoch: usize) -> f64 {
        let steps = (epoch.saturating_sub(1) / self.lr_step_epochs.max(1)) as i32;
        (self.learning_rate * self.lr_factor.powi(steps)).max(self.min_lr)
    }

    /// Names the first bad value.
    pub fn problems(&self) -> Option<String> {
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Some(format!(
                "learning rate {} must be positive",
                self.learning_rate
            ));
        }
        if !(self.lr_factor > 0.0 && self.lr_factor <= 1.0) {
            return Some(format!("lr factor {} must be in (0, 1]", self.lr_factor));
        }
        if self.batch_size == 0 || self.max_epochs == 0 || self.lr_step_epochs == 0 {
            return Some("batch size, max epochs and lr step epochs must be at least 1".into());
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_schedule_steps_every_ten_epochs_down_to_1e_7() {
        let hp = HyperParams::default();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b;
        assert!(close(hp.lr_at(1), 1e-4) && close(hp.lr_at(10), 1e-4));
        assert!(close(hp.lr_at(11), 1e-5) && close(hp.lr_at(21), 1e-6));
        assert!(close(hp.lr_at(31), 1e-7) && close(hp.lr_at(200), 1e-7));
    }
}
