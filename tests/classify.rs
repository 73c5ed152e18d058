//! End-to-end local mode: real ONNX Runtime, real bundles from the export tool,
//! real image files. Numbers are checked against identities and against an
//! independent Python implementation (onnxruntime + numpy).

mod common;

use std::path::Path;
use std::process::Command;

use cinflow::infer::{Device, InferConfig};
use cinflow::local::{classify, ClassifyOptions};
use cinflow::model::{Bundle, Head};
use cinflow::pipeline::Model;
use cinflow::pipeline::Overlays;
use cinflow::result::{ImageStatus, ResultRecord};

fn args(model: &Path, out: &Path, inputs: Vec<std::path::PathBuf>) -> ClassifyOptions {
    let mut o = common::classify_options(model, out, inputs);
    o.grader.max_batch = 3;
    o
}

fn read_record(out: &Path, key: &str) -> ResultRecord {
    let text = std::fs::read_to_string(out.join(format!("{key}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Grades, then checks every output and the CAM identity mean(M_c) + b_c = z_c (1e-4).
fn grade_and_check(classes: u32) {
    let bundle = common::tiny_bundle(classes);
    let tmp = tempfile::tempdir().unwrap();
    let images = common::synth_images(&tmp.path().join("in"), 5, 1024, 768);
    let out = tmp.path().join("out");
    let report = classify(&args(&bundle, &out, vec![tmp.path().join("in")])).unwrap();
    assert_eq!((report.total, report.graded, report.failed), (5, 5, 0));
    let head = Head::load(&bundle.join("head.safetensors")).unwrap();
    let manifest = Bundle::load(&bundle).unwrap().manifest;
    for (key, _) in &report.results {
        let rec = read_record(&out, key);
        assert_eq!(rec.schema, "cinflow.result/v2");
        assert_eq!(rec.status, ImageStatus::Ok);
        assert_eq!(rec.execution_provider, "CPUExecutionProvider");
        assert_eq!(rec.model.sha256, manifest.files);
        let img = &rec.images[0];
        assert_eq!(img.original_size, Some([1024, 768]));
        let probs = img.probabilities.as_ref().unwrap();
        assert_eq!(probs.len(), classes as usize);
        let sum: f32 = probs.values().sum();
        assert!((sum - 1.0).abs() < 1e-5, "probabilities sum to {sum}");
        let best = probs.iter().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(img.predicted_class.as_ref(), Some(best));
        assert_eq!(rec.slide_grade.as_ref().unwrap().grade, *best);
        // With --overlays all: one overlay per class, at the preprocessed size.
        assert_eq!(img.heatmaps.len(), classes as usize);
        for h in &img.heatmaps {
            assert_eq!(h.overlay, format!("{key}/heatmap-{}.jpg", h.class));
            let jpg = image::open(out.join(&h.overlay)).unwrap();
            assert_eq!((jpg.width(), jpg.height()), (800, 600));
            assert!(h.scale >= 0.0);
        }
        // The stored preprocessed image is the one the model saw, up to JPEG
        // quantisation. Quality 90 with 4:2:0 chroma gives a mean absolute error
        // of 7-9 grey levels on these synthetic images, whose strong CLAHE turns
        // them into pixel-level noise (the worst case for JPEG); real tissue loses less.
        let pre = img.preprocessed_image.as_ref().unwrap();
        assert_eq!(pre, &format!("{key}/preprocessed.jpg"));
        let stored = image::open(out.join(pre)).unwrap().to_rgb8();
        let model = Model::load(&bundle, &InferConfig::default()).unwrap();
        let source = img.uri.strip_prefix("file://").unwrap();
        let seen = model
            .prepare(&std::fs::read(source).unwrap())
            .unwrap()
            .image;
        assert_eq!(stored.dimensions(), seen.dimensions());
        let mae = stored
            .as_raw()
            .iter()
            .zip(seen.as_raw())
            .map(|(a, b)| (f64::from(*a) - f64::from(*b)).abs())
            .sum::<f64>()
            / seen.as_raw().len() as f64;
        assert!(
            mae < 10.0,
            "preprocessed JPEG differs by {mae} grey levels on average"
        );
        // The raw map: mean over positions plus the bias is the logit.
        let raw = img.raw_map.as_ref().unwrap();
        let (shape, data) = common::read_npy(&out.join(&raw.uri));
        assert_eq!(shape, raw.shape.to_vec());
        assert_eq!(shape[0], classes as usize);
        let area = shape[1] * shape[2];
        let logits = img.logits.as_ref().unwrap();
        for (r, z) in logits.iter().enumerate() {
            let mean = data[r * area..(r + 1) * area]
                .iter()
                .map(|v| f64::from(*v))
                .sum::<f64>()
                / area as f64;
            let err = (mean + f64::from(head.bias[r]) - f64::from(*z)).abs();
            assert!(err < 1e-4, "class {r}: map mean + bias - logit = {err}");
        }
    }
    let summary = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    assert_eq!(summary.lines().count(), 1 + images.len());
}

#[test]
fn four_class_bundle_grades_images_with_exact_heatmaps() {
    grade_and_check(4);
}

#[test]
fn two_class_bundle_grades_images_with_exact_heatmaps() {
    grade_and_check(2);
}

#[test]
fn three_class_bundle_grades_images() {
    grade_and_check(3);
}

#[test]
fn matches_an_independent_python_implementation() {
    for classes in [4u32, 2] {
        let bundle = common::tiny_bundle(classes);
        let tmp = tempfile::tempdir().unwrap();
        let imgs = common::synth_images(tmp.path(), 2, 1280, 960);
        let model = Model::load(&bundle, &InferConfig::default()).unwrap();
        for img_path in &imgs {
            let prepared = model.prepare(&std::fs::read(img_path).unwrap()).unwrap();
            let png = img_path.with_extension("pre.png");
            prepared.image.save(&png).unwrap();
            let graded = model.grade(&[&prepared]).unwrap().remove(0);
            let out = common::run_python(
                "tools/reference_classify.py",
                &[bundle.to_str().unwrap(), png.to_str().unwrap()],
            );
            let r: serde_json::Value = serde_json::from_str(&out).unwrap();
            let f = |k: &str| -> Vec<f64> {
                r[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect()
            };
            // Same ONNX model on the same bytes; only float summation order differs.
            for (a, b) in graded.probabilities.iter().zip(f("probabilities")) {
                assert!((f64::from(*a) - b).abs() < 1e-4, "probability {a} vs {b}");
            }
            for (a, b) in graded.logits.iter().zip(f("logits")) {
                assert!(
                    (f64::from(*a) - b).abs() < 1e-3 * (1.0 + b.abs()),
                    "logit {a} vs {b}"
                );
            }
            let maps = f("maps");
            assert_eq!(maps.len(), graded.maps.data.len());
            let peak = maps.iter().fold(0f64, |m, v| m.max(v.abs()));
            for (a, b) in graded.maps.data.iter().zip(&maps) {
                assert!(
                    (f64::from(*a) - b).abs() <= 1e-4 * peak + 1e-6,
                    "map {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn unreadable_images_become_error_entries_not_a_crash() {
    let bundle = common::tiny_bundle(4);
    let tmp = tempfile::tempdir().unwrap();
    let good = common::synth_images(&tmp.path().join("in"), 2, 640, 480);
    let garbage = tmp.path().join("in/garbage.jpg");
    std::fs::write(&garbage, b"this is not an image at all").unwrap();
    let truncated = tmp.path().join("in/truncated.jpg");
    let bytes = std::fs::read(&good[0]).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let missing = tmp.path().join("does-not-exist.png");
    let out = tmp.path().join("out");
    let report = classify(&args(
        &bundle,
        &out,
        vec![tmp.path().join("in"), missing.clone()],
    ))
    .unwrap();
    assert_eq!((report.total, report.graded, report.failed), (5, 2, 3));
    for key in ["garbage", "truncated", "does-not-exist"] {
        let rec = read_record(&out, key);
        assert_eq!(rec.status, ImageStatus::Error);
        let err = rec.images[0].error.clone().unwrap();
        assert!(!err.is_empty());
        if key == "does-not-exist" {
            assert!(err.contains("cannot read file"), "{err}");
        }
    }
    // The binary exits 3 (partial success) when some images failed, and still
    // writes the good ones.
    let out2 = tmp.path().join("out2");
    let status = Command::new(env!("CARGO_BIN_EXE_cinflow"))
        .args([
            "classify",
            "--model",
            bundle.to_str().unwrap(),
            "--out",
            out2.to_str().unwrap(),
        ])
        .arg(tmp.path().join("in"))
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(3));
    assert!(out2.join("summary.csv").exists());
}

/// Bytes stored under a folder (one image's artifacts).
fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[test]
fn batching_changes_no_grade_and_default_artifacts_are_cheap() {
    let bundle = common::tiny_bundle(4);
    let tmp = tempfile::tempdir().unwrap();
    common::synth_images(&tmp.path().join("in"), 6, 1280, 960);
    let inputs = vec![tmp.path().join("in")];
    // One image per backbone call.
    let mut alone = args(&bundle, &tmp.path().join("alone"), inputs.clone());
    alone.grader.max_batch = 1;
    let alone = classify(&alone).unwrap();
    // Up to 6 per call, waiting long enough that they do share calls; default overlays.
    let out = tmp.path().join("batched");
    let mut batched = args(&bundle, &out, inputs);
    batched.grader.max_batch = 6;
    batched.grader.batch_wait = std::time::Duration::from_millis(500);
    batched.drawing.overlays = Overlays::default();
    let batched = classify(&batched).unwrap();
    assert_eq!((alone.graded, batched.graded), (6, 6));
    let biggest = batched
        .results
        .iter()
        .map(|(_, r)| r.batch.unwrap().images)
        .max()
        .unwrap();
    assert!(biggest > 1, "no backbone call graded more than one image");
    for ((key, a), (_, b)) in alone.results.iter().zip(&batched.results) {
        assert_eq!(a.batch.unwrap().images, 1);
        let (pa, pb) = (
            a.probabilities.as_ref().unwrap(),
            b.probabilities.as_ref().unwrap(),
        );
        for (c, p) in pa {
            assert!(
                (p - pb[c]).abs() <= 1e-6,
                "{key} {c}: alone {p}, batched {}",
                pb[c]
            );
        }
        // Default: only the predicted class's overlay is drawn.
        assert_eq!(b.heatmaps.len(), 1);
        assert_eq!(Some(&b.heatmaps[0].class), b.predicted_class.as_ref());
        let bytes = folder_bytes(&out.join(key));
        assert!(
            bytes <= 500_000,
            "{key}: {bytes} bytes stored (target 0.5 MB)"
        );
    }
}

#[test]
fn tampered_or_incomplete_bundles_are_refused_with_the_reason() {
    let bundle = common::tiny_bundle(4);
    let tmp = tempfile::tempdir().unwrap();

    let changed = tmp.path().join("changed");
    common::copy_dir(&bundle, &changed);
    let mut head = std::fs::read(changed.join("head.safetensors")).unwrap();
    let last = head.len() - 1;
    head[last] ^= 0x55;
    std::fs::write(changed.join("head.safetensors"), head).unwrap();
    let e = Bundle::load(&changed).unwrap_err().to_string();
    assert!(e.contains("sha256 of head.safetensors"), "{e}");

    let missing = tmp.path().join("missing");
    common::copy_dir(&bundle, &missing);
    std::fs::remove_file(missing.join("backbone.onnx")).unwrap();
    let e = Bundle::load(&missing).unwrap_err().to_string();
    assert!(e.contains("backbone.onnx"), "{e}");

    let wrong = tmp.path().join("wrong-classes");
    common::copy_dir(&bundle, &wrong);
    let mpath = wrong.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    m["classes"] = serde_json::json!(["CIN", "Non-neoplasm", "Other", "More", "Too many"]);
    std::fs::write(&mpath, serde_json::to_string(&m).unwrap()).unwrap();
    let e = Bundle::load(&wrong).unwrap_err().to_string();
    assert!(e.contains("5 classes"), "{e}");

    // The binary refuses with exit code 4 (input error) and names the file.
    let out = Command::new(env!("CARGO_BIN_EXE_cinflow"))
        .args(["verify", changed.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("head.safetensors"));
}

#[test]
fn cuda_requested_without_cuda_is_a_clear_error() {
    let bundle = common::tiny_bundle(4);
    let cfg = InferConfig {
        device: Device::Cuda,
        ..InferConfig::default()
    };
    match Model::load(&bundle, &cfg) {
        // This machine's onnxruntime wheel is CPU-only.
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("CUDA was requested"), "{msg}");
        }
        Ok(m) => assert_eq!(m.provider(), "CUDAExecutionProvider"),
    }
}

#[test]
fn preprocess_command_writes_the_model_input_image() {
    let tmp = tempfile::tempdir().unwrap();
    let img = common::synth_images(tmp.path(), 1, 1600, 1200).remove(0);
    let out = tmp.path().join("pre.png");
    let status = Command::new(env!("CARGO_BIN_EXE_cinflow"))
        .arg("preprocess")
        .args([&img, &out])
        .status()
        .unwrap();
    assert!(status.success());
    let written = image::open(&out).unwrap().to_rgb8();
    let expected = cinflow::preprocess::preprocess(
        &std::fs::read(&img).unwrap(),
        &cinflow::preprocess::PreprocessConfig::default(),
    )
    .unwrap();
    assert_eq!(written, expected);
}
