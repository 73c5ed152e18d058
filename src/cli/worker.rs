//! `cinflow worker infer|train`: the queue workers.

use crate::worker::InferWorkerArgs;

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    #[command(subcommand)]
    pub kind: WorkerKind,
}

#[derive(Debug, clap::Subcommand)]
pub enum WorkerKind {
    /// Grade slides from the inference queue with the registry's promoted model.
    Infer(Box<InferWorkerArgs>),
    /// Retrain the head from the training queue and promote it if it is better.
    #[cfg(feature = "train")]
    Train(Box<crate::worker::train::TrainWorkerArgs>),
}

pub fn run(a: WorkerArgs) -> anyhow::Result<()> {
    // The async side only moves messages; heavy work runs on blocking threads.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("cinflow-worker")
        .enable_all()
        .build()?;
    let r = match a.kind {
        WorkerKind::Infer(args) => rt.block_on(crate::worker::run_infer(*args)),
        #[cfg(feature = "train")]
        WorkerKind::Train(args) => rt.block_on(crate::worker::train::run(*args)),
    };
    // Jobs past the drain limit were returned to the queue: do not wait for
    // their blocking work to finish.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    r
}
