//! `cinflow bench-backbone`: the bare backbone through ONNX Runtime, without
//! decoding, preprocessing or the head, at the bundle's input size. Prints one
//! JSON line (scripts/gpu-check.sh reads it).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use crate::infer::{Backbone, InferConfig};
use crate::model::Bundle;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchBackboneArgs {
    /// Model bundle folder.
    #[arg(long, env = "CINFLOW_MODEL", value_name = "BUNDLE_DIR")]
    pub model: PathBuf,
    /// Images per run.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Timed runs (after the warm-up run).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    #[command(flatten)]
    pub infer: InferConfig,
}

/// What `bench-backbone` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchBackboneReport {
    pub images_per_s: f64,
    pub ms_per_batch: f64,
    pub provider: &'static str,
    pub io_binding: bool,
    pub batch: usize,
    pub iters: usize,
    pub width: u32,
    pub height: u32,
    pub tf32: bool,
    /// `provenance.precision` of the bundle ("fp32" when absent).
    pub precision: String,
    /// The first (warm-up) run, which includes cuDNN's algorithm search.
    pub warm_up_ms: f64,
}

/// Loads the bundle's backbone, warms it up at `batch` and times `iters` runs
/// of a fixed pseudo-random batch.
pub fn bench_backbone(a: &BenchBackboneArgs) -> anyhow::Result<BenchBackboneReport> {
    if a.batch == 0 || a.iters == 0 {
        return Err(super::exit::Usage("--batch and --iters must be positive".into()).into());
    }
    let bundle = Bundle::load(&a.model)?;
    let m = &bundle.manifest;
    let backbone = Backbone::load(
        &bundle.backbone_path(),
        &m.input.name,
        &m.features.name,
        &a.infer,
    )
    .with_context(|| format!("cannot load {}", a.model.display()))?;
    let (w, h) = (m.input.width, m.input.height);
    let started = Instant::now();
    backbone.warm_up(h, w, &[a.batch])?;
    let warm_up_ms = started.elapsed().as_secs_f64() * 1e3;
    // Normalised-image-like values (a fixed LCG, no dependence on rand's stream).
    let len = a.batch * 3 * (w * h) as usize;
    let mut state = 0x2545_f491_u32;
    let batch: Vec<f32> = (0..len)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
        })
        .collect();
    let mut total = std::time::Duration::ZERO;
    for _ in 0..a.iters {
        let input = batch.clone();
        let t = Instant::now();
        let maps = backbone.features(input, a.batch, h, w)?;
        total += t.elapsed();
        anyhow::ensure!(
            maps.len() == a.batch,
            "backbone returned {} maps",
            maps.len()
        );
    }
    let secs = total.as_secs_f64();
    Ok(BenchBackboneReport {
        images_per_s: (a.batch * a.iters) as f64 / secs,
        ms_per_batch: secs * 1e3 / a.iters as f64,
        provider: backbone.provider(),
        io_binding: backbone.io_binding(),
        batch: a.batch,
        iters: a.iters,
        width: w,
        height: h,
        tf32: a.infer.tf32,
        precision: m
            .provenance
            .get("precision")
            .and_then(|p| p.as_str())
            .unwrap_or("fp32")
            .to_string(),
        warm_up_ms,
    })
}
