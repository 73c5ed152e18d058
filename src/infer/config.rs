//! Settings of ONNX Runtime sessions: the device and the CUDA / TensorRT
//! execution provider options (`cinflow ... --device cuda --tf32 true`, or the
//! `CINFLOW_*` environment variables of the same settings).

use std::path::PathBuf;

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
    /// TensorRT, with CUDA for the nodes TensorRT does not take: an error if the
    /// loaded ONNX Runtime has no TensorRT execution provider or it cannot start.
    Tensorrt,
}

impl Device {
    /// Whether sessions on this device run on an NVIDIA GPU when they start.
    pub fn wants_gpu(self) -> bool {
        matches!(self, Device::Cuda | Device::Tensorrt)
    }
}

/// cuDNN's choice of convolution algorithm (CUDA EP `cudnn_conv_algo_search`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvAlgoSearch {
    /// Time every algorithm on the first run of each input shape and keep the
    /// fastest (ONNX Runtime's own default).
    #[default]
    Exhaustive,
    /// cuDNN's heuristic pick, without timing: cheaper first runs, sometimes a
    /// slower kernel.
    Heuristic,
    /// Always implicit-precomp GEMM: the least workspace memory, rarely the fastest.
    Default,
}

/// How the CUDA memory arena grows (CUDA EP `arena_extend_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ArenaStrategy {
    /// Grow by doubling chunks (ONNX Runtime's default): fewer cudaMalloc calls.
    #[default]
    NextPowerOfTwo,
    /// Grow by exactly what is asked: a tighter footprint beside other GPU users.
    SameAsRequested,
}

/// Whether the backbone binds its input and output buffers (`IoBinding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoBindingMode {
    /// On when the session runs on a GPU (input and output in pinned host
    /// memory), off on CPU.
    #[default]
    Auto,
    /// Always: pinned host memory on a GPU, ONNX Runtime's CPU allocator on CPU.
    On,
    /// Never: plain `Session::run` with a tensor over the batch vector.
    Off,
}

impl IoBindingMode {
    /// Whether a session on `provider` binds its input and output.
    pub fn applies_to(self, provider: &str) -> bool {
        match self {
            IoBindingMode::On => true,
            IoBindingMode::Off => false,
            IoBindingMode::Auto => provider != super::providers::CPU_PROVIDER,
        }
    }
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
    /// cuDNN convolution algorithm search (CUDA and TensorRT's CUDA fallback).
    ///
    /// Exhaustive by default, as in ONNX Runtime: a served backbone sees one
    /// fixed input size and a few batch sizes, so the search runs once per batch
    /// size (in the warm-up, before the first job) and every later batch gets
    /// the fastest kernels cuDNN has for this GPU. Heuristic only pays off when
    /// shapes keep changing, which they do not here.
    #[arg(
        long,
        env = "CINFLOW_CUDNN_CONV_ALGO_SEARCH",
        value_enum,
        default_value_t = ConvAlgoSearch::Exhaustive
    )]
    pub cudnn_conv_algo_search: ConvAlgoSearch,
    /// TensorFloat-32 for convolutions and matrix products on Ampere and newer
    /// GPUs (CUDA EP `use_tf32`): faster, with a 10-bit mantissa inside the
    /// products; off keeps float32 results close to the CPU's.
    #[arg(long, env = "CINFLOW_TF32", default_value_t = false, action = clap::ArgAction::Set, value_name = "true|false")]
    pub tf32: bool,
    /// Most bytes the CUDA memory arena may hold (0: no limit).
    #[arg(
        long,
        env = "CINFLOW_GPU_MEM_LIMIT",
        default_value_t = 0,
        value_name = "BYTES"
    )]
    pub gpu_mem_limit: usize,
    /// How the CUDA memory arena grows.
    #[arg(
        long,
        env = "CINFLOW_ARENA_STRATEGY",
        value_enum,
        default_value_t = ArenaStrategy::NextPowerOfTwo
    )]
    pub arena_strategy: ArenaStrategy,
    /// Bind the backbone's input and output (pinned host memory on a GPU, so
    /// host-device copies are DMA transfers).
    #[arg(long, env = "CINFLOW_IO_BINDING", value_enum, default_value_t = IoBindingMode::Auto)]
    pub io_binding: IoBindingMode,
    /// TensorRT: folder for built engines and timing caches, so a restart
    /// loads them instead of building them again (minutes for DenseNet-161).
    #[arg(long, env = "CINFLOW_TRT_CACHE", value_name = "DIR")]
    pub trt_cache: Option<PathBuf>,
}

impl Default for InferConfig {
    fn default() -> Self {
        InferConfig {
            device: Device::Auto,
            cuda_device: 0,
            ort_lib: std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from),
            intra_threads: 0,
            cudnn_conv_algo_search: ConvAlgoSearch::Exhaustive,
            tf32: false,
            gpu_mem_limit: 0,
            arena_strategy: ArenaStrategy::NextPowerOfTwo,
            io_binding: IoBindingMode::Auto,
            trt_cache: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        infer: InferConfig,
    }

    fn parse(args: &[&str]) -> Result<InferConfig, clap::Error> {
        Cli::try_parse_from(std::iter::once("cinflow").chain(args.iter().copied())).map(|c| c.infer)
    }

    #[test]
    fn defaults_match_impl_default() {
        // Only when the environment sets none of the settings (CI does not).
        use clap::CommandFactory;
        let cmd = Cli::command();
        let mut envs = cmd.get_arguments().filter_map(|a| a.get_env());
        if envs.any(|e| e != "ORT_DYLIB_PATH" && std::env::var_os(e).is_some()) {
            return;
        }
        let parsed = parse(&[]).unwrap();
        let d = InferConfig::default();
        assert_eq!(parsed.device, d.device);
        assert_eq!(parsed.cudnn_conv_algo_search, ConvAlgoSearch::Exhaustive);
        assert_eq!(parsed.cudnn_conv_algo_search, d.cudnn_conv_algo_search);
        assert_eq!((parsed.tf32, d.tf32), (false, false));
        assert_eq!((parsed.gpu_mem_limit, d.gpu_mem_limit), (0, 0));
        assert_eq!(parsed.arena_strategy, d.arena_strategy);
        assert_eq!(parsed.io_binding, IoBindingMode::Auto);
        assert_eq!(parsed.trt_cache, None);
    }

    #[test]
    fn gpu_settings_parse() {
        let c = parse(&[
            "--device",
            "tensorrt",
            "--cudnn-conv-algo-search",
            "heuristic",
            "--tf32",
            "true",
            "--gpu-mem-limit",
            "8589934592",
            "--arena-strategy",
            "same-as-requested",
            "--io-binding",
            "off",
            "--trt-cache",
            "/var/cache/trt",
        ])
        .unwrap();
        assert_eq!(c.device, Device::Tensorrt);
        assert_eq!(c.cudnn_conv_algo_search, ConvAlgoSearch::Heuristic);
        assert!(c.tf32);
        assert_eq!(c.gpu_mem_limit, 8 << 30);
        assert_eq!(c.arena_strategy, ArenaStrategy::SameAsRequested);
        assert_eq!(c.io_binding, IoBindingMode::Off);
        assert_eq!(c.trt_cache, Some(PathBuf::from("/var/cache/trt")));
        assert!(!parse(&["--tf32", "false"]).unwrap().tf32);
        assert_eq!(
            parse(&["--cudnn-conv-algo-search", "default"])
                .unwrap()
                .cudnn_conv_algo_search,
            ConvAlgoSearch::Default
        );
    }

    #[test]
    fn bad_values_name_the_choices() {
        for (args, wanted) in [
            (&["--device", "rocm"][..], "tensorrt"),
            (&["--cudnn-conv-algo-search", "fast"], "heuristic"),
            (&["--tf32", "yes-please"], "true"),
            (&["--gpu-mem-limit", "8G"], "gpu-mem-limit"),
            (&["--arena-strategy", "double"], "next-power-of-two"),
            (&["--io-binding", "maybe"], "auto"),
        ] {
            let e = parse(args).unwrap_err().to_string();
            assert!(e.contains(wanted), "{args:?}: {e}");
        }
    }

    #[test]
    fn io_binding_auto_is_on_for_gpus_only() {
        use IoBindingMode::*;
        assert!(!Auto.applies_to("CPUExecutionProvider"));
        assert!(Auto.applies_to("CUDAExecutionProvider"));
        assert!(Auto.applies_to("TensorrtExecutionProvider"));
        assert!(On.applies_to("CPUExecutionProvider"));
        assert!(!Off.applies_to("CUDAExecutionProvider"));
        assert!(Device::Tensorrt.wants_gpu() && !Device::Auto.wants_gpu());
    }
}
