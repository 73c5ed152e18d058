//! Shared fixtures for the integration tests: the project's Python, tiny bundles
//! exported by tools/export_backbone.py, and synthetic images.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub mod faulty_s3;
pub mod http;
pub mod lis;
pub mod sklearn;
pub mod tls;
pub mod worker;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The virtual environment's Python (set by .cargo/config.toml; made by scripts/setup.sh).
pub fn python() -> PathBuf {
    let p = std::env::var_os("CINFLOW_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "{} not found: run scripts/setup.sh (or `make test`) first",
        p.display()
    );
    p
}

/// Runs `cmd`; panics with its stderr unless it succeeds; returns its stdout.
pub fn output_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Runs `cmd`: its exit code and its stdout followed by its stderr.
pub fn output_all(cmd: &mut Command) -> (Option<i32>, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// Runs a Python script of the repository with arguments; panics with its stderr on failure.
pub fn run_python(script: &str, args: &[&str]) -> String {
    output_ok(Command::new(python()).arg(root().join(script)).args(args))
}

fn leak_tempdir() -> &'static Path {
    Box::leak(Box::new(tempfile::tempdir().expect("tempdir"))).path()
}

/// Exports a tiny bundle once per test binary and returns its folder.
pub fn tiny_bundle(classes: u32) -> PathBuf {
    static FOUR: OnceLock<PathBuf> = OnceLock::new();
    static THREE: OnceLock<PathBuf> = OnceLock::new();
    static TWO: OnceLock<PathBuf> = OnceLock::new();
    let cell = match classes {
        4 => &FOUR,
        3 => &THREE,
        2 => &TWO,
        _ => panic!("no {classes}-class scheme"),
    };
    cell.get_or_init(|| {
        let dir = leak_tempdir().join(format!("tiny-{classes}"));
        run_python(
            "tools/export_backbone.py",
            &[
                "--arch",
                "tiny",
                "--classes",
                &classes.to_string(),
                "--seed",
                "3",
                "--out",
                dir.to_str().unwrap(),
            ],
        );
        dir
    })
    .clone()
}

/// Writes `n` synthetic images (one grade each, cycling) of the given size as JPEG.
pub fn synth_images(dir: &Path, n: usize, width: u32, height: u32) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    (0..n)
        .map(|i| {
            let grade = cinflow::synth::Grade::ALL[i % 4];
            let img = cinflow::synth::render(grade, width, height, 100 + i as u64);
            let p = dir.join(format!("img{i}_{}.jpg", grade.label()));
            img.save(&p).unwrap();
            p
        })
        .collect()
}

/// Copies a bundle folder (to tamper with it).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Reads a float32 `.npy` written by cinflow: (shape, data).
pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    assert!(header.contains("'<f4'"));
    let inner = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape: Vec<usize> = inner
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data = b[10 + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (shape, data)
}

/// Local-mode options for grading `inputs` with `model` into `out` on the CPU
/// (batches of up to 4, every class's overlay drawn).
pub fn classify_options(
    model: &Path,
    out: &Path,
    inputs: Vec<PathBuf>,
) -> cinflow::local::ClassifyOptions {
    cinflow::local::ClassifyOptions {
        model: model.to_path_buf(),
        out: out.to_path_buf(),
        infer: cinflow::infer::InferConfig {
            device: cinflow::infer::Device::Cpu,
            ..Default::default()
        },
        grader: cinflow::engine::GraderConfig {
            max_batch: 4,
            batch_wait: std::time::Duration::from_millis(2),
        },
        drawing: cinflow::pipeline::Drawing {
            overlays: cinflow::pipeline::Overlays::All,
            map: cinflow::cam::MapKind::GradCam,
        },
        in_flight: 0,
        inputs,
    }
}

/// The Garage server's S3 settings from the environment that
/// `scripts/garage.sh start` prints (`make test` exports them).
pub fn s3_config() -> cinflow::storage::S3Config {
    let endpoint = std::env::var("CINFLOW_S3_ENDPOINT").unwrap_or_else(|_| {
        panic!("CINFLOW_S3_ENDPOINT is not set: run `eval \"$(bash scripts/garage.sh start)\"` first (make test does)")
    });
    cinflow::storage::S3Config {
        endpoint: Some(endpoint),
        region: std::env::var("AWS_REGION").unwrap_or_else(|_| "garage".into()),
        bucket: std::env::var("CINFLOW_S3_BUCKET").unwrap_or_else(|_| "cinflow-test".into()),
        force_path_style: true,
        attempts: 3,
        backoff_ms: 50,
        timeout_s: 10,
        ca_file: None,
    }
}

/// Broker settings with exchanges and queues of their own, named after `prefix`.
pub fn amqp_config(prefix: &str) -> cinflow::queue::AmqpConfig {
    cinflow::queue::AmqpConfig {
        url: std::env::var("CINFLOW_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
        jobs_exchange: format!("{prefix}.jobs"),
        infer_queue: format!("{prefix}.infer"),
        train_queue: format!("{prefix}.train"),
        results_exchange: format!("{prefix}.results"),
        delivery_limit: 3,
        confirm_timeout_s: 30,
        heartbeat_s: 30,
        ca_file: None,
    }
}

/// A key prefix no other test run uses.
pub fn unique_prefix(what: &str) -> String {
    format!(
        "test-{what}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// Runs tools/validate_outputs.py on `docs` (JSON Schema `schema` under
/// src/queue/schemas/, or FHIR R4 when `schema` is None); returns whether all
/// are valid and what it printed.
pub fn validate_outputs(schema: Option<&str>, docs: &[serde_json::Value]) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("docs.json");
    std::fs::write(&file, serde_json::to_vec(docs).unwrap()).unwrap();
    let mut cmd = Command::new(python());
    cmd.arg(root().join("tools/validate_outputs.py"));
    match schema {
        Some(s) => cmd
            .arg("schema")
            .arg(root().join("src/queue/schemas").join(s)),
        None => cmd.arg("fhir"),
    };
    let (code, text) = output_all(cmd.arg(&file));
    (code == Some(0), text)
}

/// Panics with the validator's report unless every document is valid.
pub fn assert_valid(schema: Option<&str>, docs: &[serde_json::Value]) {
    assert!(!docs.is_empty(), "nothing to validate");
    let (ok, text) = validate_outputs(schema, docs);
    assert!(ok, "{} invalid:\n{text}", schema.unwrap_or("FHIR R4"));
    assert_eq!(text.matches("ok ").count(), docs.len(), "{text}");
}
