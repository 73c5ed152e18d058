//! `cinflow classify` arguments: parsed here, graded by [`crate::local::classify`].

use std::path::PathBuf;
use std::time::Duration;

use crate::cam::MapKind;
use crate::engine::GraderConfig;
use crate::infer::InferConfig;
use crate::local::{ClassifyOptions, ClassifyReport};
use crate::pipeline::{Drawing, Overlays};

#[derive(Debug, Clone, clap::Args)]
pub struct ClassifyArgs {
    /// Model bundle folder (manifest.json, backbone.onnx, head.safetensors).
    #[arg(long, env = "CINFLOW_MODEL", value_name = "BUNDLE_DIR")]
    pub model: PathBuf,
    /// Output folder for result JSONs, artifacts and summary.csv.
    #[arg(long)]
    pub out: PathBuf,
    /// Most images per backbone call. 0: by device, 1 on the CPU (ONNX Runtime
    /// grades one image at a time fastest there), 8 on a GPU.
    #[arg(
        long,
        visible_alias = "batch-size",
        env = "CINFLOW_MAX_BATCH",
        default_value_t = 0
    )]
    pub max_batch: usize,
    /// Longest an image waits for others to fill its backbone call, in milliseconds.
    #[arg(long, env = "CINFLOW_BATCH_WAIT_MS", default_value_t = 5)]
    pub batch_wait_ms: u64,
    /// Class overlays drawn as JPEGs: the predicted class's, every class's, or none
    /// (the preprocessed image and raw maps are always written).
    #[arg(long, value_enum, default_value_t = Overlays::Predicted)]
    pub overlays: Overlays,
    /// The map the pre-drawn overlays show: Grad-CAM (the class's evidence) or
    /// contrastive (its evidence against the classes' average). The viewer
    /// page draws either for any class.
    #[arg(long, value_enum, default_value_t = MapKind::GradCam)]
    pub heatmap: MapKind,
    /// Images being read, prepared, graded or written at once (0: twice the batch,
    /// 8 when it is chosen by device, plus the cores).
    #[arg(long, env = "CINFLOW_IMAGES_IN_FLIGHT", default_value_t = 0)]
    pub images_in_flight: usize,
    #[command(flatten)]
    pub infer: InferConfig,
    /// Image files and/or folders (searched recursively for .jpg/.jpeg/.png/.tif/.tiff).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
}

impl ClassifyArgs {
    pub fn options(&self) -> ClassifyOptions {
        ClassifyOptions {
            model: self.model.clone(),
            out: self.out.clone(),
            infer: self.infer.clone(),
            grader: GraderConfig {
                max_batch: self.max_batch,
                batch_wait: Duration::from_millis(self.batch_wait_ms),
            },
            drawing: Drawing {
                overlays: self.overlays,
                map: self.heatmap,
            },
            in_flight: self.images_in_flight,
            inputs: self.inputs.clone(),
        }
    }
}

/// Grades the arguments' images.
pub fn classify(args: &ClassifyArgs) -> anyhow::Result<ClassifyReport> {
    Ok(crate::local::classify(&args.options())?)
}
