//! The backbone's run paths on the CPU: IO binding (the code the GPU uses with
//! pinned memory, here with ONNX Runtime's CPU allocator) against plain runs,
//! warm-up, `bench-backbone`, `check-runtime --device tensorrt` on a CPU-only
//! ONNX Runtime, and a float16 export against the float32 one end to end.

mod common;

use std::process::Command;

use cinflow::infer::{Backbone, Device, InferConfig, IoBindingMode};
use cinflow::model::Bundle;

fn load(bundle: &std::path::Path, io_binding: IoBindingMode) -> Backbone {
    let b = Bundle::load(bundle).unwrap();
    let m = &b.manifest;
    Backbone::load(
        &b.backbone_path(),
        &m.input.name,
        &m.features.name,
        &InferConfig {
            device: Device::Cpu,
            io_binding,
            ..InferConfig::default()
        },
    )
    .unwrap()
}

fn batch(n: usize, h: u32, w: u32, seed: u32) -> Vec<f32> {
    let mut s = seed;
    (0..n * 3 * (h * w) as usize)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
        })
        .collect()
}

#[test]
fn bound_runs_equal_plain_runs_across_batch_sizes() {
    let bundle = common::tiny_bundle(4);
    let (h, w) = (120, 160);
    let plain = load(&bundle, IoBindingMode::Off);
    let bound = load(&bundle, IoBindingMode::On);
    assert!(!plain.io_binding() && bound.io_binding());
    assert_eq!(bound.provider(), "CPUExecutionProvider");
    // auto is off on CPU.
    assert!(!load(&bundle, IoBindingMode::Auto).io_binding());
    bound.warm_up(h, w, &[1, 3]).unwrap();
    // Sizes change and come back: the bound input buffer is reallocated and reused.
    for (i, n) in [2usize, 2, 1, 3, 2].into_iter().enumerate() {
        let x = batch(n, h, w, i as u32);
        let a = plain.features(x.clone(), n, h, w).unwrap();
        let (b, _waited) = bound.features_timed(x, n, h, w).unwrap();
        assert_eq!(a.len(), n);
        assert_eq!(a, b, "batch {i} of {n}");
        assert_eq!((a[0].channels, a[0].height, a[0].width), (64, 4, 5));
    }
    // A batch of the wrong length is an error, not a crash.
    let e = bound.features(vec![0.0; 10], 1, h, w).unwrap_err();
    assert!(e.to_string().contains("batch has 10 values"), "{e}");
}

#[test]
fn bound_backbone_is_shared_between_threads() {
    let bundle = common::tiny_bundle(4);
    let bound = load(&bundle, IoBindingMode::On);
    let plain = load(&bundle, IoBindingMode::Off);
    let (h, w) = (96, 128);
    std::thread::scope(|s| {
        for t in 0..4u32 {
            let (bound, plain) = (&bound, &plain);
            s.spawn(move || {
                for i in 0..3 {
                    let n = 1 + (t as usize + i) % 3;
                    let x = batch(n, h, w, t * 10 + i as u32);
                    assert_eq!(
                        bound.features(x.clone(), n, h, w).unwrap(),
                        plain.features(x, n, h, w).unwrap()
                    );
                }
            });
        }
    });
}

#[test]
fn bench_backbone_prints_json() {
    let bundle = common::tiny_bundle(4);
    let out = common::output_ok(
        Command::new(env!("CARGO_BIN_EXE_cinflow"))
            .args([
                "bench-backbone",
                "--batch",
                "2",
                "--iters",
                "2",
                "--device",
                "cpu",
            ])
            .args(["--io-binding", "on", "--model"])
            .arg(&bundle),
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["provider"], "CPUExecutionProvider");
    assert_eq!(v["io_binding"], true);
    assert_eq!(
        (v["batch"].as_u64(), v["iters"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(v["precision"], "fp32");
    assert!(v["images_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["ms_per_batch"].as_f64().unwrap() > 0.0);
}

#[test]
fn tensorrt_on_a_cpu_onnxruntime_is_a_clear_error() {
    let (code, text) = common::output_all(Command::new(env!("CARGO_BIN_EXE_cinflow")).args([
        "check-runtime",
        "--device",
        "tensorrt",
    ]));
    if text.contains("sessions run on TensorrtExecutionProvider") {
        return; // a machine with TensorRT
    }
    assert_eq!(code, Some(5), "runtime unavailable: {text}");
    assert!(text.contains("TensorRT was requested but"), "{text}");
    assert!(text.contains("execution provider"), "{text}");
    let (code, text) = common::output_all(Command::new(env!("CARGO_BIN_EXE_cinflow")).args([
        "check-runtime",
        "--device",
        "cpu",
    ]));
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("TensorRT execution provider: "), "{text}");
    assert!(text.contains("IO binding off"), "{text}");
}

/// Largest class-probability difference allowed between a float16 and a
/// float32 export of the same network through the whole pipeline on the CPU
/// (docs/gpu.md: measured values).
const FP16_PROB_TOL: f64 = 1e-3;

#[test]
fn fp16_export_grades_like_fp32() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bundles = Vec::new();
    for (name, extra) in [("fp32", None), ("fp16", Some("--fp16"))] {
        let dir = tmp.path().join(name);
        let mut args = vec![
            "--arch",
            "tiny",
            "--seed",
            "3",
            "--out",
            dir.to_str().unwrap(),
        ];
        args.extend(extra);
        common::run_python("tools/export_backbone.py", &args);
        let b = Bundle::load(&dir).unwrap();
        assert_eq!(b.manifest.provenance["precision"], name);
        bundles.push(dir);
    }
    let images = common::synth_images(&tmp.path().join("in"), 6, 1600, 1200);
    let graded: Vec<_> = bundles
        .iter()
        .map(|b| {
            cinflow::local::classify(&common::classify_options(
                b,
                &tmp.path()
                    .join(format!("out-{}", b.file_name().unwrap().to_string_lossy())),
                images.clone(),
            ))
            .unwrap()
        })
        .collect();
    let mut worst = 0f64;
    for ((_, a), (_, b)) in graded[0].results.iter().zip(&graded[1].results) {
        let (pa, pb) = (
            a.probabilities.as_ref().unwrap(),
            b.probabilities.as_ref().unwrap(),
        );
        for (c, p) in pa {
            worst = worst.max((f64::from(*p) - f64::from(pb[c])).abs());
        }
    }
    eprintln!("fp16 vs fp32: max probability difference {worst:.3e}");
    assert!(worst < FP16_PROB_TOL, "{worst}");
}
