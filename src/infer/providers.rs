//! Session builders on the configured device: the CUDA and TensorRT execution
//! providers with the options of [`InferConfig`].

use ort::ep::{self, ArenaExtendStrategy, ExecutionProvider};
use ort::session::{builder::GraphOptimizationLevel, Session};

use super::config::{ArenaStrategy, ConvAlgoSearch, Device, InferConfig};
use super::runtime::{default_ort_lib, environment, InferError};

pub const CPU_PROVIDER: &str = "CPUExecutionProvider";
pub(crate) const CUDA_PROVIDER: &str = "CUDAExecutionProvider";
pub(crate) const TENSORRT_PROVIDER: &str = "TensorrtExecutionProvider";

/// Whether the loaded ONNX Runtime lists the CUDA and the TensorRT execution
/// providers (compiled in; whether they start is another matter).
pub(crate) fn listed() -> (bool, bool) {
    (
        ep::CUDA::is_available().unwrap_or(false),
        ep::TensorRT::is_available().unwrap_or(false),
    )
}

/// The CUDA execution provider with the configured options. Options left at
/// ONNX Runtime's defaults are not passed (a 0 memory limit means none).
pub(crate) fn cuda(cfg: &InferConfig) -> ep::CUDA {
    let mut cuda = ep::CUDA::default()
        .with_device_id(cfg.cuda_device)
        .with_conv_algorithm_search(match cfg.cudnn_conv_algo_search {
            ConvAlgoSearch::Exhaustive => ep::cuda::ConvAlgorithmSearch::Exhaustive,
            ConvAlgoSearch::Heuristic => ep::cuda::ConvAlgorithmSearch::Heuristic,
            ConvAlgoSearch::Default => ep::cuda::ConvAlgorithmSearch::Default,
        })
        .with_tf32(cfg.tf32)
        .with_arena_extend_strategy(match cfg.arena_strategy {
            ArenaStrategy::NextPowerOfTwo => ArenaExtendStrategy::NextPowerOfTwo,
            ArenaStrategy::SameAsRequested => ArenaExtendStrategy::SameAsRequested,
        });
    if cfg.gpu_mem_limit > 0 {
        cuda = cuda.with_memory_limit(cfg.gpu_mem_limit);
    }
    cuda
}

/// The TensorRT execution provider on the same GPU, with an engine and timing
/// cache when `--trt-cache` names a folder. (The memory limit applies to the
/// CUDA fallback's arena; TensorRT manages its own engine memory.)
pub(crate) fn tensorrt(cfg: &InferConfig) -> ep::TensorRT {
    let mut trt = ep::TensorRT::default().with_device_id(cfg.cuda_device);
    if let Some(dir) = &cfg.trt_cache {
        let dir = dir.display().to_string();
        trt = trt
            .with_engine_cache(true)
            .with_engine_cache_path(&dir)
            .with_timing_cache(true)
            .with_timing_cache_path(&dir);
    }
    trt
}

fn ort_lib_name(cfg: &InferConfig) -> String {
    cfg.ort_lib
        .clone()
        .unwrap_or_else(default_ort_lib)
        .display()
        .to_string()
}

/// Why a device the configuration insists on cannot be used, before any
/// provider is registered: `None` when the loaded ONNX Runtime lists what it needs.
pub(crate) fn missing_provider(
    device: Device,
    cuda_listed: bool,
    tensorrt_listed: bool,
    ort_lib: &str,
) -> Option<InferError> {
    match device {
        Device::Cuda if !cuda_listed => Some(InferError::CudaUnavailable(format!(
            "the loaded ONNX Runtime ({ort_lib}) has no CUDA execution provider; install onnxruntime-gpu and point ORT_DYLIB_PATH at its libonnxruntime.so"
        ))),
        Device::Tensorrt if !tensorrt_listed || !cuda_listed => {
            Some(InferError::TensorRtUnavailable(format!(
                "the loaded ONNX Runtime ({ort_lib}) has no {} execution provider; use an onnxruntime-gpu build with TensorRT (and the TensorRT libraries on the loader path), or --device cuda",
                if tensorrt_listed { "CUDA" } else { "TensorRT" }
            )))
        }
        _ => None,
    }
}

/// A session builder on the configured device: loads ONNX Runtime and, when a
/// GPU is wanted, registers its execution providers (which loads the provider
/// libraries and the CUDA libraries and opens the GPU). Returns the provider
/// sessions will run on. `what` names the session in errors (the backbone's path).
pub(crate) fn session_builder(
    cfg: &InferConfig,
    what: &str,
) -> Result<(ort::session::builder::SessionBuilder, &'static str), InferError> {
    let env = environment(cfg)?;
    let serr = |e: ort::Error| InferError::Session {
        path: what.to_string(),
        detail: e.to_string(),
    };
    let (cuda_listed, tensorrt_listed) = listed();
    if let Some(e) = missing_provider(cfg.device, cuda_listed, tensorrt_listed, &ort_lib_name(cfg))
    {
        return Err(e);
    }
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
    match cfg.device {
        Device::Cpu => Ok((builder, CPU_PROVIDER)),
        Device::Auto if !cuda_listed => Ok((builder, CPU_PROVIDER)),
        Device::Auto | Device::Cuda => {
            let providers = [cuda(cfg).build().error_on_failure()];
            match builder.clone().with_execution_providers(providers) {
                Ok(b) => Ok((b, CUDA_PROVIDER)),
                Err(e) if cfg.device == Device::Cuda => Err(InferError::CudaUnavailable(format!(
                    "the CUDA execution provider could not start on device {}: {e}",
                    cfg.cuda_device
                ))),
                Err(e) => {
                    tracing::warn!(error = %e, "CUDA execution provider unavailable; using CPU");
                    Ok((builder, CPU_PROVIDER))
                }
            }
        }
        Device::Tensorrt => {
            // Registration order is priority order: TensorRT takes the nodes it
            // supports, CUDA the rest.
            let providers = [
                tensorrt(cfg).build().error_on_failure(),
                cuda(cfg).build().error_on_failure(),
            ];
            builder
                .with_execution_providers(providers)
                .map(|b| (b, TENSORRT_PROVIDER))
                .map_err(|e| {
                    InferError::TensorRtUnavailable(format!(
                        "the TensorRT execution provider could not start on device {} (it needs libnvinfer of the TensorRT version this onnxruntime-gpu was built with on the loader path): {e}",
                        cfg.cuda_device
                    ))
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensorrt_without_the_provider_names_the_problem() {
        let e = missing_provider(Device::Tensorrt, false, false, "/x/libonnxruntime.so")
            .unwrap()
            .to_string();
        assert!(e.starts_with("TensorRT was requested but"), "{e}");
        assert!(e.contains("no TensorRT execution provider"), "{e}");
        assert!(
            e.contains("/x/libonnxruntime.so") && e.contains("--device cuda"),
            "{e}"
        );
        let e = missing_provider(Device::Tensorrt, false, true, "lib")
            .unwrap()
            .to_string();
        assert!(e.contains("no CUDA execution provider"), "{e}");
        assert!(missing_provider(Device::Tensorrt, true, true, "lib").is_none());
        assert!(missing_provider(Device::Auto, false, false, "lib").is_none());
        assert!(missing_provider(Device::Cpu, false, false, "lib").is_none());
        let e = missing_provider(Device::Cuda, false, true, "lib")
            .unwrap()
            .to_string();
        assert!(e.starts_with("CUDA was requested but"), "{e}");
    }

    #[test]
    fn provider_options_are_ort_names() {
        let cfg = InferConfig {
            tf32: true,
            gpu_mem_limit: 1 << 30,
            cudnn_conv_algo_search: ConvAlgoSearch::Heuristic,
            arena_strategy: ArenaStrategy::SameAsRequested,
            ..InferConfig::default()
        };
        let o = format!("{:?}", cuda(&cfg));
        for (k, v) in [
            ("use_tf32", "1"),
            ("gpu_mem_limit", "1073741824"),
            ("cudnn_conv_algo_search", "HEURISTIC"),
            ("arena_extend_strategy", "kSameAsRequested"),
            ("device_id", "0"),
        ] {
            assert!(o.contains(k) && o.contains(v), "{k}={v} not in {o}");
        }
        let o = format!("{:?}", cuda(&InferConfig::default()));
        assert!(!o.contains("gpu_mem_limit"), "{o}");
        let cfg = InferConfig {
            trt_cache: Some("/tmp/trt".into()),
            ..InferConfig::default()
        };
        let o = format!("{:?}", tensorrt(&cfg));
        assert!(
            o.contains("trt_engine_cache_path") && o.contains("/tmp/trt"),
            "{o}"
        );
    }
}
