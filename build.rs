//! With the `train` feature the binary links libtorch from the project's virtual
//! environment (tch + LIBTORCH_USE_PYTORCH). An rpath to the venv's torch/lib lets
//! `cargo run` / `cargo test` load it with no LD_LIBRARY_PATH; deployed images set
//! LD_LIBRARY_PATH instead.
//!
//! The rpath is the *resolved* folder inside the shared cache venv, not the
//! clone's `.venv` link: the cargo target folder is shared by every clone, and a
//! binary built in one clone must not point into another (possibly deleted) one.
//!
//! It also records where the venv's ONNX Runtime library is (resolved the same
//! way) as the binary's last default, so an installed `cinflow` run from any
//! folder finds it without `ORT_DYLIB_PATH`.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let ort = root.join(".venv/cinflow-lib/libonnxruntime.so");
    println!("cargo:rerun-if-changed={}", ort.display());
    if let Ok(resolved) = std::fs::canonicalize(&ort) {
        println!(
            "cargo:rustc-env=CINFLOW_BUILD_ORT_LIB={}",
            resolved.display()
        );
    }
    if std::env::var_os("CARGO_FEATURE_TRAIN").is_none() {
        return;
    }
    let link = root.join(".venv/cinflow-lib/torch");
    // Rerun when setup.sh points the link at another venv.
    println!("cargo:rerun-if-changed={}", link.display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("tools/requirements.txt").display()
    );
    let torch_lib = std::fs::canonicalize(&link).unwrap_or(link);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", torch_lib.display());
}
