//! The serving engine that local mode (`cinflow classify`) and the inference
//! worker share: CPU work on the rayon pool awaited from async code
//! ([`on_cpu`]), and one inference thread per loaded model that batches
//! images across jobs ([`Grader`]). The I/O around them (files, or S3 and
//! RabbitMQ) belongs to the caller.
//!
//! The split follows text-embeddings-inference's router/backend: async code
//! moves requests and bytes, and never computes; CPU-heavy stages (decode,
//! CLAHE, rendering) run on rayon; the backbone runs on its own thread, fed by
//! a bounded queue, so one batch of a GPU's worth of images can come from many
//! small jobs.

mod grader;

pub use grader::{Grader, GraderConfig, ACCELERATOR_BATCH, AUTO_BATCH};

/// Runs `f` on the rayon pool and awaits its result (a panic there is
/// re-raised here). Async code calls CPU-heavy stages through this, so the
/// runtime's threads keep moving bytes and heartbeats.
pub async fn on_cpu<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = tokio::sync::oneshot::channel();
    rayon::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    match rx.await {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => unreachable!("a rayon task always answers"),
    }
}
