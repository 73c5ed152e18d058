//! Exit codes as scripts and schedulers see them (docs/cli.md#exit-codes):
//! each kind of failure ends with its own code, and with `--log-format json`
//! the fatal error is one JSON log line a log collector can parse.

mod common;

use std::path::Path;
use std::process::Command;

fn cinflow(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cinflow"));
    c.args(args);
    c.env_remove("CINFLOW_LOG_FORMAT");
    c
}

/// Exit code, stdout and stderr.
fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("start cinflow");
    (
        out.status.code().expect("exited, not killed"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The last stderr line as JSON: a fatal error in `--log-format json`.
fn fatal_json(stderr: &str) -> serde_json::Value {
    let line = stderr.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not one JSON line ({e}): {stderr}"))
}

fn classify(bundle: &Path, out: &Path, images: &[&Path], extra: &[&str]) -> Command {
    let mut c = cinflow(&["classify"]);
    c.arg("--model").arg(bundle).arg("--out").arg(out);
    c.args(extra).args(images);
    c
}

#[test]
fn usage_errors_exit_2_and_are_json_when_asked() {
    let (code, _, err) = run(&mut cinflow(&["classify", "--no-such-flag"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--no-such-flag"), "{err}");

    let (code, _, err) = run(&mut cinflow(&[
        "--log-format",
        "json",
        "classify",
        "--no-such-flag",
    ]));
    assert_eq!(code, 2, "{err}");
    let j = fatal_json(&err);
    assert_eq!(j["level"], "ERROR", "{j}");
    assert_eq!(j["fields"]["exit_code"], 2, "{j}");
    assert_eq!(j["fields"]["exit"], "usage", "{j}");
    assert!(
        j["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("--no-such-flag")),
        "{j}"
    );

    // Contradictory arguments found by the command itself are usage errors too.
    let mut no_images = cinflow(&["enqueue"]);
    no_images.env("CINFLOW_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f");
    let (code, _, err) = run(&mut no_images);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no images given"), "{err}");
}

#[test]
fn input_partial_and_runtime_failures_have_their_own_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = common::tiny_bundle(4);
    let good = common::synth_images(&tmp.path().join("good"), 1, 640, 480);
    let broken = tmp.path().join("broken.jpg");
    std::fs::write(&broken, b"not a JPEG at all").unwrap();

    // A missing bundle: input error, named.
    let missing = tmp.path().join("no-such-bundle");
    let (code, _, err) = run(&mut classify(
        &missing,
        &tmp.path().join("o1"),
        &[&good[0]],
        &[],
    ));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("no-such-bundle"), "{err}");

    // One image graded, one refused: partial success.
    let out = tmp.path().join("o2");
    let (code, _, err) = run(&mut classify(&bundle, &out, &[&good[0], &broken], &[]));
    assert_eq!(code, 3, "{err}");
    let summary = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    assert_eq!(
        summary.lines().filter(|l| l.contains(",ok,")).count(),
        1,
        "{summary}"
    );

    // Nothing could be graded: input error.
    let (code, _, err) = run(&mut classify(
        &bundle,
        &tmp.path().join("o3"),
        &[&broken],
        &[],
    ));
    assert_eq!(code, 4, "{err}");

    // No ONNX Runtime where it was pointed: runtime unavailable, as JSON.
    let (code, _, err) = run(&mut classify(
        &bundle,
        &tmp.path().join("o4"),
        &[&good[0]],
        &[
            "--ort-lib",
            "/nonexistent/libonnxruntime.so",
            "--log-format",
            "json",
        ],
    ));
    assert_eq!(code, 5, "{err}");
    let j = fatal_json(&err);
    assert_eq!(j["fields"]["exit"], "runtime-unavailable", "{j}");
    assert!(
        j["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("/nonexistent/libonnxruntime.so")),
        "{j}"
    );
    let (code, _, err) = run(&mut cinflow(&[
        "check-runtime",
        "--ort-lib",
        "/nonexistent/libonnxruntime.so",
    ]));
    assert_eq!(code, 5, "{err}");
    assert!(err.starts_with("error: "), "{err}");
}

#[test]
fn an_unreachable_broker_is_service_unavailable() {
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let (code, _, err) = run(&mut cinflow(&[
        "enqueue",
        "s3://bucket/slide/a.jpg",
        "--amqp-url",
        "amqp://guest:guest@127.0.0.1:1/%2f",
    ]));
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("127.0.0.1:1"), "{err}");
}
