//! Retraining the head on signed-out cases (`cinflow train`, and later the
//! training worker): labels -> patient-level split -> features of the 8 views
//! through the serving path (cached) -> head trained with tch -> evaluation on the
//! locked test split -> report -> new bundle version -> promotion in the registry.
//!
//! Everything except the tch head training (`head`) and the run that uses it
//! (`run`) is plain Rust and builds without the `train` feature.

mod features;
#[cfg(feature = "train")]
mod head;
mod hyper;
mod labels;
#[cfg(feature = "train")]
mod ood;
#[cfg(feature = "train")]
mod report_files;
#[cfg(feature = "train")]
mod review;
#[cfg(feature = "train")]
mod run;
pub mod split;
pub mod views;

pub use features::{
    extract, preprocess_key, view_features, ExtractStats, FeatureCache, FeatureError, ImageFeatures,
};
#[cfg(feature = "train")]
pub use head::{train_head, HeadData, HeadTrainError, TrainedHead};
pub use hyper::{HyperParams, Solver, TrainDevice};
pub use labels::{
    parse_labels, read_labels, signed_out_counts, write_labels, LabelRow, LabelsError, SignedOut,
};
#[cfg(feature = "train")]
pub use run::{train, TrainOutcome};
pub use split::{Split, SplitFractions, SplitPlan};

use std::path::PathBuf;
use std::sync::Arc;

use crate::infer::InferConfig;
use crate::model::PromotionPolicy;
use crate::storage::ObjectStore;

/// Everything `cinflow train` needs.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainOptions {
    /// Labels CSV: path (or uri), label (CIN3, CIN2, CIN1, Non-neoplasm or a class
    /// of the scheme), patient_id; extra columns are ignored.
    #[arg(long, env = "CINFLOW_TRAIN_LABELS")]
    pub labels: PathBuf,
    /// The frozen backbone: a bundle folder, or a bare ONNX file with input
    /// `image` and output `features` (800x600, ImageNet normalisation assumed).
    #[arg(long, env = "CINFLOW_TRAIN_BACKBONE")]
    pub backbone: PathBuf,
    /// Refuse a backbone whose sha256 is not this.
    #[arg(long, env = "CINFLOW_TRAIN_BACKBONE_SHA256")]
    pub backbone_sha256: Option<String>,
    /// Folder for the new bundle (its report goes in `report/` inside it).
    #[arg(long)]
    pub out: PathBuf,
    /// Class scheme: 4 (CIN3, CIN2, CIN1, Non-neoplasm), 3 (CIN2-3, CIN1,
    /// Non-neoplasm) or 2 (CIN, Non-neoplasm); default: the backbone bundle's.
    #[arg(long, env = "CINFLOW_TRAIN_CLASSES", value_parser = clap::value_parser!(u8).range(2..=4))]
    pub classes: Option<u8>,
    /// Model name in the manifest and the registry (default: the backbone bundle's).
    #[arg(
        long = "model-name",
        alias = "name",
        env = "CINFLOW_MODEL_NAME",
        value_name = "NAME"
    )]
    pub name: Option<String>,
    /// Version of the new bundle (default: UTC timestamp like 20261125T220000Z).
    #[arg(long)]
    pub version: Option<String>,
    /// Share of each class's patients in the validation split.
    #[arg(long, env = "CINFLOW_TRAIN_VALIDATION_FRACTION", default_value_t = 0.2)]
    pub validation_fraction: f64,
    /// Share of each class's patients in the locked test split (the seed held out 10%).
    #[arg(long, env = "CINFLOW_TRAIN_TEST_FRACTION", default_value_t = 0.1)]
    pub test_fraction: f64,
    /// Feature cache folder (default: `.cinflow-cache` beside the labels file).
    #[arg(long, env = "CINFLOW_FEATURE_CACHE")]
    pub feature_cache: Option<PathBuf>,
    /// Registry folder: publish the new version there and promote it if it is good enough.
    #[arg(long, env = "CINFLOW_REGISTRY")]
    pub registry: Option<PathBuf>,
    /// Registry alias that inference follows.
    #[arg(
        long = "model-alias",
        alias = "alias",
        env = "CINFLOW_MODEL_ALIAS",
        value_name = "ALIAS",
        default_value = "current"
    )]
    pub alias: String,
    #[command(flatten)]
    pub promotion: PromotionPolicy,
    /// Test images shown in the Grad-CAM gallery.
    #[arg(long, default_value_t = 12)]
    pub gallery: usize,
    #[command(flatten)]
    pub hyper: HyperParams,
    #[command(flatten)]
    pub infer: InferConfig,
    #[command(flatten)]
    pub signing: crate::model::signing::ModelSigning,
    /// The registry's store when it is not a local folder (the training worker's S3).
    #[arg(skip)]
    pub registry_store: Option<Arc<dyn ObjectStore>>,
    /// The feature cache's store and key prefix when it is not a local folder.
    #[arg(skip)]
    pub feature_store: Option<(Arc<dyn ObjectStore>, String)>,
    /// What to call the labels in the report and provenance (their S3 URI).
    #[arg(skip)]
    pub labels_uri: Option<String>,
    /// The labels already read, with their images staged locally (the training
    /// worker); `labels` is then only hashed for the provenance.
    #[arg(skip)]
    pub labels_rows: Option<Vec<LabelRow>>,
}

/// Why training failed. Data problems are permanent; store hiccups may pass.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Labels(#[from] LabelsError),
    #[error("{0}")]
    Data(String),
    #[error(transparent)]
    Split(#[from] split::SplitError),
    #[error(transparent)]
    Features(#[from] FeatureError),
    #[error(transparent)]
    Model(#[from] crate::pipeline::ModelError),
    #[error(transparent)]
    Bundle(#[from] crate::model::BundleError),
    #[error(transparent)]
    Infer(#[from] crate::infer::InferError),
    #[error(transparent)]
    Registry(#[from] crate::model::RegistryError),
    #[cfg(feature = "train")]
    #[error("head training: {0}")]
    Head(#[from] HeadTrainError),
    #[error("report: {0}")]
    Report(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl crate::retry::Transient for TrainError {
    /// Whether the same job could succeed later (only object-store hiccups).
    fn is_transient(&self) -> bool {
        match self {
            TrainError::Features(FeatureError::Store(e)) => e.is_transient(),
            TrainError::Registry(r) => r.is_transient(),
            _ => false,
        }
    }
}
