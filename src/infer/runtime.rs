//! The ONNX Runtime session around a bundle's `backbone.onnx`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::ep::{self, ExecutionProvider};
use ort::session::{builder::GraphOptimizationLevel, Session};
use ort::value::Tensor;

use super::FeatureMap;

/// Where inference runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// CUDA when this ONNX Runtime build has it and a GPU answers, else CPU.
    #[default]
    Auto,
    /// CPU only.
    Cpu,
    /// CUDA only: an error if it is not available (never a silent fallback).
    Cuda,
}

/// How to load ONNX Runtime and build sessions.
#[derive(Debug, Clone, clap::Args)]
pub struct InferConfig {
    /// Execution device.
    #[arg(long, env = "CINFLOW_DEVICE", value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// CUDA device ordinal.
    #[arg(long, env = "CINFLOW_CUDA_DEVICE", default_value_t = 0)]
    pub cuda_device: i32,
    /// ONNX Runtime shared library (libonnxruntime.so) to load.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_lib: Option<PathBuf>,
    /// Threads ONNX Runtime uses inside one inference (0: its default).
    #[arg(long, env = "CINFLOW_INTRA_THREADS", default_value_t = 0)]
    pub intra_threads: usize,
}

impl Default for InferConfig {
    fn default() -> Self {
        InferConfig {
            device: Device::Auto,
            cuda_device: 0,
            ort_lib: std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from),
            intra_threads: 0,
        }
    }
}

/// Inference failures. `Runtime` and `Session` are set-up problems; `Run` is a
/// failed inference call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferError {
    #[error("cannot load ONNX Runtime from {path}: {detail}. Run scripts/setup.sh, or point --ort-lib / ORT_DYLIB_PATH at libonnxruntime.so (onnxruntime-gpu for CUDA)")]
    Runtime { path: String, detail: String },
    #[error("CUDA was requested but {0}")]
    CudaUnavailable(String),
    #[error("cannot load backbone {path}: {detail}")]
    Session { path: String, detail: String },
    #[error("backbone {path} does not fit its manifest: {detail}")]
    Interface { path: String, detail: String },
    #[error("inference failed: {0}")]
    Run(String),
}

impl crate::retry::Transient for InferError {
    /// Never: a backbone that fails once fails again on the same input, and a
    /// missing runtime or GPU does not come back by waiting. Retrying a broken
    /// model would only hold the job for the whole retry budget.
    fn is_transient(&self) -> bool {
        false
    }
}

static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

fn environment(cfg: &InferConfig) -> Result<&'static ort::environment::Environment, InferError> {
    let path = cfg.ort_lib.clone().unwrap_or_else(default_ort_lib);
    ENVIRONMENT
        .get_or_init(|| {
            let builder = ort::init_from(&path).map_err(|e| e.to_string())?;
            builder
                .with_name("cinflow")
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|detail| InferError::Runtime {
            path: path.display().to_string(),
            detail: detail.clone(),
        })
}

/// Without `--ort-lib`/`ORT_DYLIB_PATH`: the project's venv when run from the
/// checkout, a library beside the executable (container images), else the
/// system loader's search path.
fn default_ort_lib() -> PathBuf {
    let beside_exe = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("libonnxruntime.so")));
    [
        Some(PathBuf::from(".venv/cinflow-lib/libonnxruntime.so")),
        beside_exe,
    ]
    .into_iter()
    .flatten()
    .find(|p| p.exists())
    .unwrap_or_else(|| PathBuf::from("libonnxruntime.so"))
}

/// A session builder on the configured device: loads ONNX Runtime and, when
/// CUDA is wanted, registers its execution provider (which loads the provider
/// library and the CUDA libraries and opens the GPU). Returns the provider
/// sessions will run on.
/// `what` names the session in errors (the backbone's path).
fn session_builder(
    cfg: &InferConfig,
    what: &str,
) -> Result<(ort::session::builder::SessionBuilder, &'static str), InferError> {
    let env = environment(cfg)?;
    let serr = |e: ort::Error| InferError::Session {
        path: what.to_string(),
        detail: e.to_string(),
    };
    let cuda_listed = ep::CUDA::is_available().unwrap_or(false);
    let want_cuda = match cfg.device {
        Device::Cpu => false,
        Device::Cuda if !cuda_listed => {
            return Err(InferError::CudaUnavailable(format!(
                "the loaded ONNX Runtime ({}) has no CUDA execution provider; install onnxruntime-gpu and point ORT_DYLIB_PATH at its libonnxruntime.so",
                cfg.ort_lib.clone().unwrap_or_else(default_ort_lib).display()
            )))
        }
        Device::Cuda => true,
        Device::Auto => cuda_listed,
    };
    let mut builder = Session::builder(env)
        .map_err(serr)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| serr(e.into()))?
        // Decoding and CLAHE of the next images run beside inference: idle
        // ONNX Runtime threads must sleep, not spin on the cores they need.
        .with_intra_op_spinning(false)
        .map_err(|e| serr(e.into()))?;
    if cfg.intra_threads > 0 {
        builder = builder
            .with_intra_threads(cfg.intra_threads)
            .map_err(|e| serr(e.into()))?;
    }
    let mut provider = "CPUExecutionProvider";
    if want_cuda {
        let cuda = ep::CUDA::default()
            .with_device_id(cfg.cuda_device)
            .build()
            .error_on_failure();
        match builder.clone().with_execution_providers([cuda]) {
            Ok(b) => {
                builder = b;
                provider = "CUDAExecutionProvider";
            }
            Err(e) if cfg.device == Device::Cuda => {
                return Err(InferError::CudaUnavailable(format!(
                    "the CUDA execution provider could not start on device {}: {e}",
                    cfg.cuda_device
                )))
            }
            Err(e) => {
                tracing::warn!(error = %e, "CUDA execution provider unavailable; using CPU");
            }
        }
    }
    Ok((builder, provider))
}

/// What `cinflow check-runtime` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RuntimeReport {
    pub ort_lib: String,
    /// Whether this ONNX Runtime build has the CUDA execution provider.
    pub cuda_listed: bool,
    /// The provider sessions would run on with this configuration.
    pub provider: &'static str,
}

/// Loads ONNX Runtime and sets up the configured device without a model, so a
/// node (or an image) can be checked before it serves: `--device cuda` fails
/// with the reason when the GPU cannot be used.
pub fn check_runtime(cfg: &InferConfig) -> Result<RuntimeReport, InferError> {
    let (_, provider) = session_builder(cfg, "(no model)")?;
    Ok(RuntimeReport {
        ort_lib: cfg
            .ort_lib
            .clone()
            .unwrap_or_else(default_ort_lib)
            .display()
            .to_string(),
        cuda_listed: ep::CUDA::is_available().unwrap_or(false),
        provider,
    })
}

/// A loaded backbone. `features` serialises calls through a mutex: ONNX Runtime
/// parallelises inside one run, and workers feed it batches from one thread.
pub struct Backbone {
    session: Mutex<Session>,
    input: String,
    output: String,
    provider: &'static str,
    path: PathBuf,
}

impl std::fmt::Debug for Backbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backbone")
            .field("path", &self.path)
            .field("provider", &self.provider)
            .finish()
    }
}

impl Backbone {
    /// Builds a session for `path` on the configured device and checks that it
    /// has the named input and output.
    pub fn load(
        path: &Path,
        input: &str,
        output: &str,
        cfg: &InferConfig,
    ) -> Result<Backbone, InferError> {
        let p = path.display().to_string();
        let serr = |e: ort::Error| InferError::Session {
            path: p.clone(),
            detail: e.to_string(),
        };
        let (mut builder, provider) = session_builder(cfg, &p)?;
        let session = builder.commit_from_file(path).map_err(serr)?;
        let names = |outlets: &[ort::value::Outlet]| -> Vec<String> {
            outlets.iter().map(|o| o.name().to_string()).collect()
        };
        let (ins, outs) = (names(session.inputs()), names(session.outputs()));
        if !ins.iter().any(|n| n == input) || !outs.iter().any(|n| n == output) {
            return Err(InferError::Interface {
                path: p,
                detail: format!(
                    "expected input {input:?} and output {output:?}, the model has inputs {ins:?} and outputs {outs:?}"
                ),
            });
        }
        Ok(Backbone {
            session: Mutex::new(session),
            input: input.to_string(),
            output: output.to_string(),
            provider,
            path: path.to_path_buf(),
        })
    }

    /// The execution provider the session runs on.
    pub fn provider(&self) -> &'static str {
        self.provider
    }

    /// Runs a batch: `batch` is `n x 3 x height x width` float32 (NCHW).
    pub fn features(
        &self,
        batch: Vec<f32>,
        n: usize,
        height: u32,
        width: u32,
    ) -> Result<Vec<FeatureMap>, InferError> {
        self.features_timed(batch, n, height, width).map(|(f, _)| f)
    }

    /// [`Backbone::features`], also returning how long the call waited for the
    /// session (another thread's inference) before it ran.
    pub fn features_timed(
        &self,
        batch: Vec<f32>,
        n: usize,
        height: u32,
        width: u32,
    ) -> Result<(Vec<FeatureMap>, std::time::Duration), InferError> {
        let shape = [n, 3, height as usize, width as usize];
        debug_assert_eq!(batch.len(), shape.iter().product::<usize>());
        let tensor =
            Tensor::from_array((shape, batch)).map_err(|e| InferError::Run(e.to_string()))?;
        let waiting = std::time::Instant::now();
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let waited = waiting.elapsed();
        let outputs = session
            .run(ort::inputs![self.input.as_str() => tensor])
            .map_err(|e| InferError::Run(e.to_string()))?;
        let (dims, data) = outputs[self.output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(|e| InferError::Run(format!("output {:?}: {e}", self.output)))?;
        if dims.len() != 4 || dims[0] as usize != n {
            return Err(InferError::Interface {
                path: self.path.display().to_string(),
                detail: format!(
                    "output {:?} has shape {dims:?}, expected [{n}, K, h, w]",
                    self.output
                ),
            });
        }
        let (k, h, w) = (dims[1] as usize, dims[2] as usize, dims[3] as usize);
        let maps = data
            .chunks_exact(k * h * w)
            .map(|chunk| FeatureMap {
                channels: k,
                height: h,
                width: w,
                data: chunk.to_vec(),
            })
            .collect();
        Ok((maps, waited))
    }
}
