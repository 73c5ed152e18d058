//! One inference thread per loaded model, batching images across jobs.
//!
//! Callers hand a prepared image to [`Grader::grade`] and await its grade. The
//! thread takes the first waiting image, then collects more for at most
//! `batch_wait` or until `max_batch` are there, runs them through the backbone
//! in one call, and routes each grade back to its caller. Under load the queue
//! is never empty and batches fill without waiting; when idle, a lone image
//! waits at most `batch_wait`. So two one-image jobs that arrive together share
//! one backbone call.
//!
//! The queue is bounded (`2 * max_batch` images): a caller waits for room, which
//! is the backpressure that keeps prepared tensors from piling up in memory.
//! Dropping the [`Grader`] closes the queue; the thread grades what is queued
//! and exits, dropping its model (and its ONNX Runtime session) last.

use std::collections::HashSet;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::infer::InferError;
use crate::pipeline::{BatchInfo, Graded, Model, Prepared};

/// How the inference thread batches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GraderConfig {
    /// Most images per backbone call; [`AUTO_BATCH`] chooses by device
    /// ([`GraderConfig::for_provider`]).
    pub max_batch: usize,
    /// Longest an image waits for others to join its batch.
    pub batch_wait: Duration,
}

/// `max_batch` value that lets the device decide: one image per call on the
/// CPU, [`ACCELERATOR_BATCH`] on a GPU.
pub const AUTO_BATCH: usize = 0;

/// The automatic batch on a GPU (CUDA, TensorRT): large enough that the
/// device is not idle between calls.
pub const ACCELERATOR_BATCH: usize = 8;

impl Default for GraderConfig {
    fn default() -> Self {
        GraderConfig {
            max_batch: AUTO_BATCH,
            batch_wait: Duration::from_millis(5),
        }
    }
}

impl GraderConfig {
    /// The configuration a session on `provider` runs with: an automatic batch
    /// becomes 1 on the CPU, where ONNX Runtime grades one image at a time
    /// fastest (bigger batches only add activation memory: `scripts/bench-worker.sh`
    /// measures DenseNet-161 and the tiny backbone 15-40% slower per image at
    /// batch 8), and [`ACCELERATOR_BATCH`] on a GPU.
    pub fn for_provider(self, provider: &str) -> GraderConfig {
        let max_batch = match self.max_batch {
            AUTO_BATCH if provider == crate::infer::CPU_PROVIDER => 1,
            AUTO_BATCH => ACCELERATOR_BATCH,
            n => n,
        };
        GraderConfig { max_batch, ..self }
    }

    /// The batch used to size queues before the device is known: the
    /// configured one, or the larger automatic one.
    pub fn sizing_batch(&self) -> usize {
        match self.max_batch {
            AUTO_BATCH => ACCELERATOR_BATCH,
            n => n,
        }
    }
}

struct Request {
    prepared: Arc<Prepared>,
    /// Which job (or run) the image belongs to, to count jobs per batch.
    job: u64,
    queued: Instant,
    reply: oneshot::Sender<Result<Graded, InferError>>,
    /// Room in the queue, given back when the batch starts.
    _room: OwnedSemaphorePermit,
}

/// A model with its inference thread.
pub struct Grader {
    model: Arc<Model>,
    queue: mpsc::Sender<Request>,
    room: Arc<Semaphore>,
    cfg: GraderConfig,
}

impl std::fmt::Debug for Grader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grader")
            .field("model", &self.model.manifest().version)
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl Grader {
    /// Starts the inference thread of `model`.
    pub fn start(model: Arc<Model>, cfg: GraderConfig) -> Grader {
        let cfg = cfg.for_provider(model.provider());
        let (queue, rx) = mpsc::channel();
        let m = model.clone();
        std::thread::Builder::new()
            .name(format!("cinflow-grade-{}", model.manifest().version))
            .spawn(move || run(&m, &rx, cfg))
            .expect("cannot start the inference thread");
        Grader {
            model,
            queue,
            room: Arc::new(Semaphore::new(2 * cfg.max_batch)),
            cfg,
        }
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// How this grader batches (the automatic batch resolved for its device).
    pub fn config(&self) -> GraderConfig {
        self.cfg
    }

    /// Grades one prepared image of job `job` in the next batch.
    pub async fn grade(&self, prepared: Arc<Prepared>, job: u64) -> Result<Graded, InferError> {
        let room = self
            .room
            .clone()
            .acquire_owned()
            .await
            .expect("the queue's semaphore is never closed");
        let (reply, answer) = oneshot::channel();
        let req = Request {
            prepared,
            job,
            queued: Instant::now(),
            reply,
            _room: room,
        };
        if self.queue.send(req).is_err() {
            return Err(InferError::Run("the inference thread has stopped".into()));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(InferError::Run("the inference thread panicked".into())))
    }
}

/// The inference thread: batch, run, route, until the queue closes.
fn run(model: &Model, rx: &mpsc::Receiver<Request>, cfg: GraderConfig) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let deadline = Instant::now() + cfg.batch_wait;
        while batch.len() < cfg.max_batch {
            // What is already queued joins without waiting.
            let next = match rx.try_recv() {
                Ok(r) => Ok(r),
                Err(mpsc::TryRecvError::Empty) => {
                    rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                }
                Err(mpsc::TryRecvError::Disconnected) => break,
            };
            match next {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        grade_batch(model, batch);
    }
}

fn grade_batch(model: &Model, batch: Vec<Request>) {
    let started = Instant::now();
    let jobs = batch.iter().map(|r| r.job).collect::<HashSet<_>>().len();
    crate::observe::metrics()
        .backbone_batch_images
        .observe(batch.len() as f64);
    let images: Vec<&Prepared> = batch.iter().map(|r| r.prepared.as_ref()).collect();
    let graded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.grade(&images)))
        .unwrap_or_else(|_| Err(InferError::Run("the backbone panicked".into())));
    crate::observe::health().progress();
    match graded {
        Ok(graded) => {
            for (req, mut g) in batch.into_iter().zip(graded) {
                g.timings.infer_wait_ms += started.duration_since(req.queued).as_secs_f64() * 1e3;
                g.batch = BatchInfo {
                    images: g.batch.images,
                    jobs,
                };
                let _ = req.reply.send(Ok(g));
            }
        }
        Err(e) => {
            for req in batch {
                let _ = req.reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_automatic_batch_is_one_on_the_cpu_and_larger_on_a_gpu() {
        let auto = GraderConfig::default();
        assert_eq!(auto.max_batch, AUTO_BATCH);
        assert_eq!(auto.for_provider(crate::infer::CPU_PROVIDER).max_batch, 1);
        assert_eq!(
            auto.for_provider("CUDAExecutionProvider").max_batch,
            ACCELERATOR_BATCH
        );
        assert_eq!(auto.sizing_batch(), ACCELERATOR_BATCH);
        let set = GraderConfig {
            max_batch: 3,
            ..auto
        };
        assert_eq!(set.for_provider(crate::infer::CPU_PROVIDER).max_batch, 3);
        assert_eq!(set.for_provider("TensorrtExecutionProvider").max_batch, 3);
        assert_eq!(set.sizing_batch(), 3);
    }
}
