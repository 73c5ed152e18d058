//! The ONNX Runtime session around a bundle's `backbone.onnx`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::session::Session;
use ort::value::Tensor;

use super::binding::Bound;
use super::providers::{listed, session_builder};
use super::{FeatureMap, InferConfig, IoBindingMode};

/// Inference failures. `Runtime` and `Session` are set-up problems; `Run` is a
/// failed inference call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferError {
    #[error("cannot load ONNX Runtime from {path}: {detail}. Run scripts/setup.sh, or point --ort-lib / ORT_DYLIB_PATH at libonnxruntime.so (onnxruntime-gpu for CUDA)")]
    Runtime { path: String, detail: String },
    #[error("CUDA was requested but {0}")]
    CudaUnavailable(String),
    #[error("TensorRT was requested but {0}")]
    TensorRtUnavailable(String),
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

pub(crate) fn environment(
    cfg: &InferConfig,
) -> Result<&'static ort::environment::Environment, InferError> {
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
/// checkout, a library beside the executable (container images), the venv
/// library the binary was built against (an installed binary run from any
/// folder), else the system loader's search path.
pub(crate) fn default_ort_lib() -> PathBuf {
    let beside_exe = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("libonnxruntime.so")));
    [
        Some(PathBuf::from(".venv/cinflow-lib/libonnxruntime.so")),
        beside_exe,
        option_env!("CINFLOW_BUILD_ORT_LIB").map(PathBuf::from),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.exists())
    .unwrap_or_else(|| PathBuf::from("libonnxruntime.so"))
}

/// What `cinflow check-runtime` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RuntimeReport {
    pub ort_lib: String,
    /// Whether this ONNX Runtime build has the CUDA execution provider.
    pub cuda_listed: bool,
    /// Whether this ONNX Runtime build lists the TensorRT execution provider
    /// (it still needs the TensorRT libraries to start).
    pub tensorrt_listed: bool,
    /// The provider sessions would run on with this configuration.
    pub provider: &'static str,
    /// Whether backbones would bind their input and output (`--io-binding`).
    pub io_binding: bool,
}

/// Loads ONNX Runtime and sets up the configured device without a model, so a
/// node (or an image) can be checked before it serves: `--device cuda` or
/// `--device tensorrt` fails with the reason when the GPU cannot be used.
pub fn check_runtime(cfg: &InferConfig) -> Result<RuntimeReport, InferError> {
    let (_, provider) = session_builder(cfg, "(no model)")?;
    let (cuda_listed, tensorrt_listed) = listed();
    Ok(RuntimeReport {
        ort_lib: cfg
            .ort_lib
            .clone()
            .unwrap_or_else(default_ort_lib)
            .display()
            .to_string(),
        cuda_listed,
        tensorrt_listed,
        provider,
        io_binding: cfg.io_binding.applies_to(provider),
    })
}

/// The session and, when binding is on, its binding and buffers.
struct Engine {
    session: Session,
    bound: Option<Bound>,
}

/// A loaded backbone. `features` serialises calls through a mutex: ONNX Runtime
/// parallelises inside one run, and workers feed it batches from one thread.
pub struct Backbone {
    engine: Mutex<Engine>,
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
            .field("io_binding", &self.io_binding())
            .finish()
    }
}

impl Backbone {
    /// Builds a session for `path` on the configured device and checks that it
    /// has the named input and output. With `--io-binding on` a binding that
    /// cannot be set up is an error; with `auto` it falls back to plain runs.
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
        let bound = if cfg.io_binding.applies_to(provider) {
            match Bound::new(&session, provider, cfg.cuda_device, output) {
                Ok(b) => Some(b),
                Err(e) if cfg.io_binding == IoBindingMode::On => {
                    return Err(InferError::Session {
                        path: p,
                        detail: format!("cannot bind input and output on {provider}: {e}"),
                    })
                }
                Err(e) => {
                    tracing::warn!(error = %e, provider, "IO binding unavailable; plain runs");
                    None
                }
            }
        } else {
            None
        };
        Ok(Backbone {
            engine: Mutex::new(Engine { session, bound }),
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

    /// Whether runs go through an `IoBinding` (pinned host memory on a GPU).
    pub fn io_binding(&self) -> bool {
        let engine = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        engine.bound.is_some()
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

    /// One run per batch size on a blank `height x width` batch, so that what
    /// ONNX Runtime does lazily on the first run of a shape (cuDNN's
    /// convolution algorithm search, arena growth, pinned buffers, TensorRT
    /// engine builds) happens before serving rather than in the first jobs.
    pub fn warm_up(
        &self,
        height: u32,
        width: u32,
        batch_sizes: &[usize],
    ) -> Result<(), InferError> {
        let per_image = 3 * height as usize * width as usize;
        for &n in batch_sizes.iter().filter(|n| **n > 0) {
            let started = std::time::Instant::now();
            self.features(vec![0f32; n * per_image], n, height, width)?;
            tracing::debug!(
                batch = n,
                ms = started.elapsed().as_secs_f64() * 1e3,
                provider = self.provider,
                "backbone warmed up"
            );
        }
        Ok(())
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
        if batch.len() != shape.iter().product::<usize>() {
            return Err(InferError::Run(format!(
                "batch has {} values, {n} x 3 x {height} x {width} needs {}",
                batch.len(),
                shape.iter().product::<usize>()
            )));
        }
        crate::observe::health().progress();
        let waiting = std::time::Instant::now();
        let mut engine = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        let waited = waiting.elapsed();
        let Engine { session, bound } = &mut *engine;
        let (dims, data) = match bound {
            Some(bound) => bound.run(session, &self.input, &self.output, shape, &batch)?,
            None => {
                let tensor = Tensor::from_array((shape, batch))
                    .map_err(|e| InferError::Run(e.to_string()))?;
                let outputs = session
                    .run(ort::inputs![self.input.as_str() => tensor])
                    .map_err(|e| InferError::Run(e.to_string()))?;
                let (dims, data) = outputs[self.output.as_str()]
                    .try_extract_tensor::<f32>()
                    .map_err(|e| InferError::Run(format!("output {:?}: {e}", self.output)))?;
                (dims.to_vec(), data.to_vec())
            }
        };
        drop(engine);
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
            .chunks_exact((k * h * w).max(1))
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
