//! ONNX Runtime inference: the frozen backbone produces the feature map `A`
//! (K x h x w per image); pooling and the head run in Rust so that Grad-CAM can
//! reuse the same feature map exactly.

mod binding;
mod config;
mod providers;
pub use providers::CPU_PROVIDER;
mod runtime;

pub use config::{ArenaStrategy, ConvAlgoSearch, Device, InferConfig, IoBindingMode};
pub use runtime::{check_runtime, Backbone, InferError, RuntimeReport};

/// One image's backbone output: `channels` planes of `height x width`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureMap {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl FeatureMap {
    /// Spatial positions per channel (`h * w`).
    pub fn area(&self) -> usize {
        self.height * self.width
    }

    /// Plane `k` as a slice.
    pub fn plane(&self, k: usize) -> &[f32] {
        &self.data[k * self.area()..(k + 1) * self.area()]
    }

    /// Global average pooling: the mean of every plane (accumulated in f64).
    pub fn global_average_pool(&self) -> Vec<f32> {
        let n = self.area() as f64;
        (0..self.channels)
            .map(|k| (self.plane(k).iter().map(|v| f64::from(*v)).sum::<f64>() / n) as f32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_is_the_plane_mean() {
        let f = FeatureMap {
            channels: 2,
            height: 2,
            width: 2,
            data: vec![1.0, 2.0, 3.0, 4.0, -1.0, -1.0, 1.0, 5.0],
        };
        assert_eq!(f.global_average_pool(), vec![2.5, 1.0]);
    }
}
