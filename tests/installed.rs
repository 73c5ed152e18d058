//! The binary as a person runs it after `make install`: copied out of the
//! cargo target folder, started from another folder with a minimal
//! environment (no `ORT_DYLIB_PATH`, no venv, no cargo), it still finds ONNX
//! Runtime and grades an image.

mod common;

use std::process::Command;

#[test]
fn an_installed_binary_grades_an_image_from_any_folder_with_a_clean_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin/cinflow");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_cinflow"), &bin).unwrap();
    let bundle = common::tiny_bundle(4);
    let images = common::synth_images(&tmp.path().join("mine"), 1, 640, 480);
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let (code, text) = common::output_all(
        Command::new(&bin)
            .args(["classify", "--model"])
            .arg(&bundle)
            .arg("--out")
            .arg(tmp.path().join("out"))
            .arg(&images[0])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", tmp.path())
            .current_dir(&elsewhere),
    );
    assert_eq!(code, Some(0), "{text}");
    let summary = std::fs::read_to_string(tmp.path().join("out/summary.csv")).unwrap();
    let rows: Vec<&str> = summary.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{summary}");
    assert!(rows[0].contains(",ok,"), "{summary}");
}
