//! With the `train` feature the binary links libtorch from the project's virtual
//! environment (tch + LIBTORCH_USE_PYTORCH); an rpath to the stable link that
//! scripts/setup.sh makes lets `cargo run` / `cargo test` load it with no
//! LD_LIBRARY_PATH. Deployed images set LD_LIBRARY_PATH instead.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_TRAIN").is_some() {
        let root = std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{root}/.venv/cinflow-lib/torch");
    }
}
