//! Where a job's results live: deterministic keys from the job id and the
//! model version, so a redelivered job rewrites the same objects.
//!
//! `results/<job_id>/<model>/<version>/`, the model named as the registry
//! names it (the bundle manifest's own name may differ):
//! `result.json` (written last), `diagnostic-report.json`, `viewer.html`, and per image
//! `images/NNN/<artifact>` (see [`crate::pipeline::artifacts`]); the LIS
//! bridge adds `lis/<destination>.json`, what the LIS answered.

use crate::storage::join_key;

/// Keys of one job's results under one model version.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// `model`: the registry's model name; `version`: the version's name there.
    pub fn new(results_prefix: &str, job_id: &str, model: &str, version: &str) -> Keys {
        Keys {
            prefix: join_key(&[results_prefix, job_id, model, version]),
        }
    }

    /// The keys of the result set whose record is at `result_key`
    /// (`.../result.json`), as the LIS bridge finds it in a result event.
    pub fn of_result(result_key: &str) -> Option<Keys> {
        let prefix = result_key.strip_suffix("/result.json")?;
        (!prefix.is_empty()).then(|| Keys {
            prefix: prefix.to_string(),
        })
    }

    /// The LIS bridge's delivery receipt for one destination (`hl7`, `fhir`).
    pub fn lis_receipt(&self, destination: &str) -> String {
        join_key(&[&self.prefix, "lis", &format!("{destination}.json")])
    }

    pub fn result(&self) -> String {
        join_key(&[&self.prefix, "result.json"])
    }

    pub fn viewer(&self) -> String {
        join_key(&[&self.prefix, crate::viewer::VIEWER_NAME])
    }

    pub fn fhir(&self) -> String {
        join_key(&[&self.prefix, "diagnostic-report.json"])
    }

    /// An artifact of the job's image `image` (its index in the job).
    pub fn artifact(&self, image: usize, name: &str) -> String {
        join_key(&[&self.prefix, &Self::artifact_in_job(image, name)])
    }

    /// [`Keys::artifact`] relative to the job's prefix: how the viewer page,
    /// beside `result.json`, links it.
    pub fn artifact_in_job(image: usize, name: &str) -> String {
        format!("images/{image:03}/{name}")
    }
}
