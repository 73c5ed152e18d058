//! Stage 2, prepare: decode, CLAHE, resize and normalise on the rayon pool,
//! with the served model's parameters. Pure: bytes in, tensor out, no I/O.

use std::sync::Arc;

use crate::engine::on_cpu;
use crate::pipeline::{Model, Prepared};
use crate::preprocess::PreprocessError;

/// Prepares one image's bytes for `model`; `fetch_ms` goes into its timings.
pub async fn prepare(
    model: &Arc<Model>,
    bytes: Vec<u8>,
    fetch_ms: f64,
) -> Result<Prepared, PreprocessError> {
    let model = model.clone();
    let mut p = on_cpu(move || model.prepare(&bytes)).await?;
    p.timings.fetch_ms = fetch_ms;
    Ok(p)
}
