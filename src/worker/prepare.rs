//! Stage 2, prepare: decode, CLAHE, resize and normalise on the rayon pool,
//! with the served model's parameters. Pure: bytes in, tensor out, no I/O.
//!
//! Memory: an image is admitted against the worker's decode budget
//! (`--memory-budget-mb`) from its header before it is decoded, over all jobs
//! in flight ([`crate::preprocess::decode_cost`] estimates the peak), and
//! holds its share until its tensor exists. One image that needs more than the
//! whole budget is refused with the reason, never retried.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::engine::on_cpu;
use crate::pipeline::{Model, Prepared};
use crate::preprocess::{decode_cost, PreprocessError, MAX_PIXELS};

/// Prepares images within a memory budget.
#[derive(Debug)]
pub struct Preparer {
    /// One permit per MiB of the budget.
    budget: Semaphore,
    budget_mib: u32,
}

impl Preparer {
    pub fn new(budget_mib: u32) -> Preparer {
        let budget_mib = budget_mib.max(1);
        crate::observe::metrics()
            .decode_budget_bytes
            .set(i64::from(budget_mib) << 20);
        Preparer {
            budget: Semaphore::new(budget_mib as usize),
            budget_mib,
        }
    }

    /// Prepares one image's bytes for `model`; `fetch_ms` goes into its timings.
    pub async fn prepare(
        &self,
        model: &Arc<Model>,
        bytes: Vec<u8>,
        fetch_ms: f64,
    ) -> Result<Prepared, PreprocessError> {
        // An unreadable header, or one over the pixel limit, costs nothing:
        // decoding refuses it at once, with that reason, before any pixel exists.
        let cost =
            decode_cost(&bytes).filter(|c| u64::from(c.width) * u64::from(c.height) <= MAX_PIXELS);
        let need = cost.map_or(1, |c| c.mib);
        if let Some(c) = cost.filter(|c| c.mib > self.budget_mib) {
            return Err(PreprocessError::OverBudget {
                width: c.width,
                height: c.height,
                need_mib: c.mib,
                budget_mib: self.budget_mib,
            });
        }
        let _share = self.budget.acquire_many(need).await.expect("never closed");
        let in_use = crate::observe::metrics().decode_budget_used_bytes.clone();
        in_use.inc_by(i64::from(need) << 20);
        let model = model.clone();
        let p = on_cpu(move || model.prepare(&bytes)).await;
        in_use.dec_by(i64::from(need) << 20);
        let mut p = p?;
        p.timings.fetch_ms = fetch_ms;
        Ok(p)
    }
}

/// The default `--memory-budget-mb`: half the container's memory limit
/// (cgroup v2 `memory.max` or v1 `memory.limit_in_bytes`), or a quarter of
/// the machine's memory when there is no limit; at least 1024 MiB.
pub fn default_budget_mib() -> u32 {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let limit = read("/sys/fs/cgroup/memory.max")
        .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&b| b < (1u64 << 60));
    let total = read("/proc/meminfo").and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb << 10)
    });
    let bytes = match (limit, total) {
        (Some(l), Some(t)) => l.min(t) / 2,
        (Some(l), None) => l / 2,
        (None, Some(t)) => t / 4,
        (None, None) => 4 << 30,
    };
    ((bytes >> 20).max(1024)).min(u64::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_budget_is_at_least_a_gibibyte() {
        assert!(super::default_budget_mib() >= 1024);
    }
}
