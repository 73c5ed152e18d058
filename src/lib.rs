//! cinflow: grades cervical biopsy images for cervical intraepithelial neoplasia
//! (CIN3, CIN2, CIN1, Non-neoplasm) with a frozen ONNX backbone and a linear head,
//! and explains every grade with an exact Grad-CAM heatmap.
//!
//! One module per stage of the data flow:
//! `preprocess` (decode, CLAHE, resize, normalise) -> `infer` (ONNX Runtime backbone,
//! pooling, head) -> `cam` (Grad-CAM maps and overlays) -> `pipeline` (the per-image
//! path that the CLI and the workers share) -> `result` (the `cinflow.result/v2` record).
//! `model` holds the bundle (manifest, backbone, head) and `synth` the synthetic
//! CIN-like images used by the demo, tests and benchmarks. `storage` (local folder
//! and S3), `queue` (RabbitMQ topology and messages) and `worker` (the inference
//! and training workers) put the pipeline behind the broker.

pub mod cam;
pub mod cli;
pub mod engine;
pub mod hashing;
pub mod infer;
pub mod lis;
pub mod listen;
pub mod local;
pub mod model;
pub mod observe;
pub mod pipeline;
pub mod preprocess;
pub mod progress;
pub mod quality;
pub mod queue;
pub mod report;
pub mod result;
pub mod retry;
pub mod storage;
pub mod synth;
pub mod train;
pub mod viewer;
pub mod watch;
pub mod worker;
