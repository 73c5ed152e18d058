//! The model bundle: `manifest.json` + `backbone.onnx` + `head.safetensors`
//! (docs/model.md, "Model bundle"), loaded and verified before anything is served.

mod bundle;
mod head;
mod manifest;
pub mod ood;
pub mod triage;

pub use bundle::{Bundle, BundleError, BACKBONE_FILE, HEAD_FILE, MANIFEST_FILE};
pub use head::{fit_diagonal_lda, probabilities, Head, HeadError};
pub use manifest::{
    Calibration, ClassScheme, FeatureSpec, InputSpec, Manifest, PreprocessSpec, Task, BUNDLE_SCHEMA,
};
pub mod registry;
pub mod signing;

pub use ood::{OodModel, OodSpec, OOD_FILE};
pub use triage::{OperatingPoint, ReferBand, Triage, CIN2_PLUS};

pub use registry::{
    AliasRecord, Compared, Decision, PromotionFigures, PromotionPolicy, Registry, RegistryError,
};
