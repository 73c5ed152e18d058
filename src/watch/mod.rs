//! `cinflow watch`: scanner intake that needs no one. It polls an S3 prefix
//! that scanners upload into, and enqueues one inference job per complete
//! slide version, exactly once.
//!
//! - **Slides.** Every folder (key prefix) under the watched prefix that holds
//!   images directly is a slide: `scans/S24-0117_A1/1.jpg`, `.../2.jpg`.
//! - **Complete.** A slide is enqueued when its marker object is there
//!   (`--marker`, default `.done`, written by the scanner after the images), or
//!   when none of its objects changed for `--settle-s` seconds (by the objects'
//!   last-modified times, so a restart does not restart the wait). A slide
//!   still being uploaded is neither.
//! - **LIS ids.** From a sidecar `slide.json` beside the images
//!   (`{"slide_id", "accession_id", "patient_id", "specimen_id"}`, each
//!   optional), else from `--id-pattern`, a regular expression on the folder
//!   name with named groups of the same names; the slide id defaults to the
//!   folder name.
//! - **Exactly once per slide version.** The version is the sha256 of the
//!   bucket, the folder and every image's key and ETag; the job id is
//!   `watch-` and its first 32 hex digits, so the same version always makes the
//!   same job. After the broker confirms the job, a state object
//!   `<state-prefix>/<version>.json` records it, and a version with a state
//!   object is never enqueued again: restarts and re-listing enqueue nothing
//!   twice. A new or replaced image makes a new version, graded again.
//! - **One active watcher.** Replicas elect a leader through the broker: the
//!   one whose connection holds the exclusive queue
//!   `cinflow.watch.<hash of the prefix>` polls, the others wait and take over
//!   when its connection ends. A crash between the confirm and the state
//!   object re-publishes the same job id, which the workers' claim turns into
//!   one grading.

mod local;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::queue::messages::{JobMessage, JOB_SCHEMA};
use crate::queue::{confirm_channel, connect, declare_topology, publish_json, AmqpConfig};
use crate::storage::{join_key, ListedObject, S3Client, S3Config};

/// Schema tag of a state object.
pub const STATE_SCHEMA: &str = "cinflow.watch-state/v1";

/// How the watcher finds and enqueues slides.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// The prefix scanners upload into: s3://bucket/prefix.
    #[arg(long, env = "CINFLOW_WATCH_PREFIX")]
    pub prefix: String,
    /// Seconds between listings.
    #[arg(long, env = "CINFLOW_WATCH_INTERVAL_S", default_value_t = 30)]
    pub interval_s: u64,
    /// A slide is complete once none of its objects changed for this many
    /// seconds (0: only the marker completes a slide).
    #[arg(long, env = "CINFLOW_WATCH_SETTLE_S", default_value_t = 300)]
    pub settle_s: u64,
    /// Name of the object a scanner writes beside a slide's images when it is
    /// done with it (empty: no marker, settle time only).
    #[arg(long, env = "CINFLOW_WATCH_MARKER", default_value = ".done")]
    pub marker: String,
    /// Name of the sidecar with the slide's LIS ids.
    #[arg(long, env = "CINFLOW_WATCH_SIDECAR", default_value = "slide.json")]
    pub sidecar: String,
    /// Regular expression on the slide's folder name whose named groups
    /// (slide_id, accession_id, patient_id, specimen_id) give its LIS ids, e.g.
    /// `^(?P<accession_id>S\d{2}-\d+)_(?P<slide_id>\w+)$`.
    #[arg(long, env = "CINFLOW_WATCH_ID_PATTERN")]
    pub id_pattern: Option<String>,
    /// Key prefix (in the watched bucket) of the state objects that record
    /// every enqueued slide version.
    #[arg(
        long,
        env = "CINFLOW_WATCH_STATE_PREFIX",
        default_value = "cinflow-watch"
    )]
    pub state_prefix: String,
    /// Registry version or alias the jobs name (default: the workers' alias).
    #[arg(long, value_name = "VERSION_OR_ALIAS")]
    pub model_version: Option<String>,
    /// A folder a scanner writes to: its files are uploaded under the watched
    /// prefix (relative paths as keys) once unchanged for --local-min-age-s,
    /// the marker last, before each listing.
    #[arg(long, env = "CINFLOW_WATCH_LOCAL_DIR")]
    pub local_dir: Option<PathBuf>,
    /// Seconds a local file must be unchanged before it is uploaded.
    #[arg(long, env = "CINFLOW_WATCH_LOCAL_MIN_AGE_S", default_value_t = 10)]
    pub local_min_age_s: u64,
    /// List once, enqueue what is complete, and exit (no leader election).
    #[arg(long)]
    pub once: bool,
    /// Address of /metrics, /healthz and /readyz (`off`: none). Ready while
    /// connected to the broker; /healthz fails when a listing hangs for
    /// three intervals and a minute.
    #[arg(long, env = "CINFLOW_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: String,
    #[command(flatten)]
    pub amqp: AmqpConfig,
    #[command(flatten)]
    pub s3: S3Config,
}

/// Why the watcher cannot run.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Store(#[from] crate::storage::StoreError),
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueError),
}

/// LIS ids of a slide.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlideIds {
    #[serde(default)]
    pub slide_id: Option<String>,
    #[serde(default)]
    pub accession_id: Option<String>,
    #[serde(default)]
    pub patient_id: Option<String>,
    #[serde(default)]
    pub specimen_id: Option<String>,
}

/// One slide folder as listed.
#[derive(Debug, Clone, PartialEq)]
pub struct Slide {
    /// The folder's key prefix, without the trailing '/'.
    pub folder: String,
    pub images: Vec<ListedObject>,
    pub marker: bool,
    /// The sidecar's key, when there is one.
    pub sidecar: Option<String>,
    /// Newest last-modified time of any of its objects.
    pub newest_unix_s: i64,
}

impl Slide {
    /// The folder's own name (its last segment).
    pub fn name(&self) -> &str {
        self.folder.rsplit('/').next().unwrap_or(&self.folder)
    }

    /// The version: sha256 of the bucket, folder and every image's key and ETag.
    pub fn version(&self, bucket: &str) -> String {
        let mut text = format!("cinflow.watch/v1\n{bucket}\n{}\n", self.folder);
        for o in &self.images {
            text.push_str(&format!("{}\t{}\n", o.key, o.etag));
        }
        crate::hashing::sha256_hex(text.as_bytes())
    }
}

/// The watcher's settings, parsed.
#[derive(Debug, Clone)]
pub struct Rules {
    pub bucket: String,
    pub prefix: String,
    pub settle_s: u64,
    pub marker: Option<String>,
    pub sidecar: String,
    pub id_pattern: Option<regex::Regex>,
    pub state_prefix: String,
}

impl Rules {
    pub fn from_args(a: &WatchArgs) -> Result<Rules, WatchError> {
        let (bucket, prefix) = crate::storage::split_s3_prefix(&a.prefix).ok_or_else(|| {
            WatchError::Usage(format!("--prefix {:?} is not s3://bucket/prefix", a.prefix))
        })?;
        let id_pattern = a
            .id_pattern
            .as_deref()
            .map(regex::Regex::new)
            .transpose()
            .map_err(|e| WatchError::Usage(format!("--id-pattern: {e}")))?;
        if let Some(re) = &id_pattern {
            let known = ["slide_id", "accession_id", "patient_id", "specimen_id"];
            let unknown: Vec<&str> = re
                .capture_names()
                .flatten()
                .filter(|n| !known.contains(n))
                .collect();
            if !unknown.is_empty() {
                return Err(WatchError::Usage(format!(
                    "--id-pattern has groups {unknown:?}; the known ones are {known:?}"
                )));
            }
        }
        let marker = Some(a.marker.trim().to_string()).filter(|m| !m.is_empty());
        if marker.is_none() && a.settle_s == 0 {
            return Err(WatchError::Usage(
                "with no --marker, --settle-s must be above 0 or no slide is ever complete".into(),
            ));
        }
        let state_prefix = a.state_prefix.trim_matches('/').to_string();
        if state_prefix.is_empty() {
            return Err(WatchError::Usage("--state-prefix must not be empty".into()));
        }
        Ok(Rules {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            settle_s: a.settle_s,
            marker,
            sidecar: a.sidecar.clone(),
            id_pattern,
            state_prefix,
        })
    }

    /// The slides in a listing of the watched prefix (state objects and
    /// folders without images left out), in key order.
    pub fn slides(&self, listing: &[ListedObject]) -> Vec<Slide> {
        let mut by_folder: BTreeMap<&str, Slide> = BTreeMap::new();
        let state = format!("{}/", self.state_prefix);
        for o in listing {
            if o.key.starts_with(&state) {
                continue;
            }
            let Some((folder, file)) = o.key.rsplit_once('/') else {
                continue; // objects at the bucket root are no slide
            };
            let slide = by_folder.entry(folder).or_insert_with(|| Slide {
                folder: folder.to_string(),
                images: vec![],
                marker: false,
                sidecar: None,
                newest_unix_s: 0,
            });
            slide.newest_unix_s = slide.newest_unix_s.max(o.modified_unix_s);
            if Some(file) == self.marker.as_deref() {
                slide.marker = true;
            } else if file == self.sidecar {
                slide.sidecar = Some(o.key.clone());
            } else if crate::local::inputs::is_image_key(&o.key) {
                slide.images.push(o.clone());
            }
        }
        by_folder
            .into_values()
            .filter(|s| !s.images.is_empty())
            .collect()
    }

    /// Whether `slide` is complete at `now` (seconds since the epoch).
    pub fn complete(&self, slide: &Slide, now_unix_s: i64) -> bool {
        slide.marker
            || (self.settle_s > 0 && now_unix_s - slide.newest_unix_s >= self.settle_s as i64)
    }

    /// The slide's ids: the sidecar's (given), else the pattern's, else the
    /// folder name as slide id.
    pub fn ids(&self, slide: &Slide, sidecar: Option<SlideIds>) -> SlideIds {
        let mut ids = sidecar.unwrap_or_default();
        if let Some(c) = self
            .id_pattern
            .as_ref()
            .and_then(|re| re.captures(slide.name()))
        {
            let get = |n: &str| c.name(n).map(|m| m.as_str().to_string());
            ids.slide_id = ids.slide_id.or_else(|| get("slide_id"));
            ids.accession_id = ids.accession_id.or_else(|| get("accession_id"));
            ids.patient_id = ids.patient_id.or_else(|| get("patient_id"));
            ids.specimen_id = ids.specimen_id.or_else(|| get("specimen_id"));
        }
        if ids.slide_id.is_none() {
            ids.slide_id = Some(slide.name().to_string());
        }
        ids
    }

    /// The job of a complete slide version.
    pub fn job(&self, slide: &Slide, ids: SlideIds, model: Option<&str>) -> JobMessage {
        let version = slide.version(&self.bucket);
        JobMessage {
            schema: JOB_SCHEMA.into(),
            job_id: format!("watch-{}", &version[..32]),
            slide_id: ids.slide_id.unwrap_or_else(|| slide.name().to_string()),
            images: slide
                .images
                .iter()
                .map(|o| format!("s3://{}/{}", self.bucket, o.key))
                .collect(),
            model: model.map(str::to_string),
            accession_id: ids.accession_id,
            patient_id: ids.patient_id,
            specimen_id: ids.specimen_id,
        }
    }

    /// The key of a slide version's state object.
    pub fn state_key(&self, version: &str) -> String {
        join_key(&[&self.state_prefix, &format!("{version}.json")])
    }
}

/// What a state object records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateRecord {
    pub schema: String,
    pub version: String,
    pub job_id: String,
    pub slide_id: String,
    pub folder: String,
    pub images: Vec<String>,
    pub enqueued_at: String,
}

/// What one poll did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollOutcome {
    /// Jobs published (job id, slide id).
    pub enqueued: Vec<(String, String)>,
    /// Complete slides whose version was enqueued before.
    pub already: usize,
    /// Slides still being uploaded.
    pub waiting: usize,
    /// Slides that could not be enqueued, with the reason (e.g. a bad sidecar).
    pub refused: Vec<(String, String)>,
}

/// Lists the prefix once and enqueues every complete slide version that has
/// no state object yet, on `ch` (a confirm channel with the topology declared).
pub async fn poll(
    rules: &Rules,
    s3: &S3Client,
    ch: &lapin::Channel,
    amqp: &AmqpConfig,
    model: Option<&str>,
) -> Result<PollOutcome, WatchError> {
    let listing = s3.list_objects(&rules.bucket, &rules.prefix).await?;
    // The versions enqueued before: one listing, not a request per slide.
    let enqueued: std::collections::BTreeSet<String> = s3
        .list(&rules.bucket, &format!("{}/", rules.state_prefix))
        .await?
        .into_iter()
        .collect();
    let now = chrono::Utc::now().timestamp();
    let mut out = PollOutcome::default();
    for slide in rules.slides(&listing) {
        if !rules.complete(&slide, now) {
            out.waiting += 1;
            continue;
        }
        let version = slide.version(&rules.bucket);
        let state = rules.state_key(&version);
        if enqueued.contains(&state) {
            out.already += 1;
            continue;
        }
        let sidecar = match &slide.sidecar {
            Some(key) => {
                let bytes = s3.get(&rules.bucket, key, 1 << 20).await?;
                match serde_json::from_slice::<SlideIds>(&bytes) {
                    Ok(ids) => Some(ids),
                    Err(e) => {
                        let why = format!("sidecar s3://{}/{key} is not valid: {e}", rules.bucket);
                        tracing::warn!(folder = %slide.folder, "{why}; slide not enqueued");
                        out.refused.push((slide.folder.clone(), why));
                        continue;
                    }
                }
            }
            None => None,
        };
        let job = rules.job(&slide, rules.ids(&slide, sidecar), model);
        let payload = serde_json::to_vec(&job).expect("job serialises");
        if let Err(e) = JobMessage::parse(&payload) {
            let why = format!("the slide's job is not valid: {e}");
            tracing::warn!(folder = %slide.folder, "{why}; slide not enqueued");
            out.refused.push((slide.folder.clone(), why));
            continue;
        }
        publish_json(
            ch,
            amqp,
            &amqp.jobs_exchange,
            crate::queue::INFER_KEY,
            &job.job_id,
            &payload,
            None,
        )
        .await?;
        let record = StateRecord {
            schema: STATE_SCHEMA.into(),
            version: version.clone(),
            job_id: job.job_id.clone(),
            slide_id: job.slide_id.clone(),
            folder: slide.folder.clone(),
            images: job.images.clone(),
            enqueued_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        s3.put(
            &rules.bucket,
            &state,
            serde_json::to_vec_pretty(&record)
                .expect("state serialises")
                .into(),
            "application/json",
        )
        .await?;
        tracing::info!(job_id = %job.job_id, slide_id = %job.slide_id, images = job.images.len(), folder = %slide.folder, "slide enqueued");
        out.enqueued.push((job.job_id, job.slide_id));
    }
    Ok(out)
}

/// The exclusive queue whose holder is the active watcher of `rules`' prefix.
pub fn leader_queue(rules: &Rules) -> String {
    let h = crate::hashing::sha256_hex(format!("{}/{}", rules.bucket, rules.prefix).as_bytes());
    format!("cinflow.watch.{}", &h[..16])
}

/// Runs the watcher: one poll with `--once`, else until the process is stopped,
/// reconnecting after broker or S3 failures.
pub async fn run(a: &WatchArgs) -> Result<(), WatchError> {
    let rules = Rules::from_args(a)?;
    let s3 = S3Client::connect(&a.s3).await?;
    let mut local = a
        .local_dir
        .as_deref()
        .map(|d| local::LocalFolder::new(d, Duration::from_secs(a.local_min_age_s)))
        .transpose()?;
    let interval = Duration::from_secs(a.interval_s.max(1));
    let leader = leader_queue(&rules);
    let health = crate::observe::health();
    let metrics = crate::observe::metrics();
    if !a.once && a.metrics_addr != "off" {
        // A watcher loads no model: readiness is the broker session alone.
        health.set_model_loaded(true);
        health.set_stall_limit(interval * 3 + Duration::from_secs(60));
        let bound = crate::observe::http::serve(&a.metrics_addr)
            .await
            .map_err(|e| WatchError::Usage(format!("--metrics-addr {}: {e}", a.metrics_addr)))?;
        tracing::info!("metrics and probes on http://{bound}");
    }
    loop {
        let session = async {
            let conn = connect(&a.amqp, "cinflow-watch").await?;
            let ch = confirm_channel(&conn).await?;
            declare_topology(&ch, &a.amqp).await?;
            health.set_broker_connected(true);
            if a.once {
                if let Some(l) = local.as_mut() {
                    l.sync(&rules, &s3).await?;
                }
                report(&poll(&rules, &s3, &ch, &a.amqp, a.model_version.as_deref()).await?);
                return Ok::<bool, WatchError>(true);
            }
            // The active watcher holds the leader lease as long as its
            // connection lives.
            let mut lease = None;
            loop {
                if lease.is_none() {
                    lease = crate::queue::lease::try_take(&conn, &leader).await?;
                    let leading = lease.is_some();
                    metrics.watch_active.set(i64::from(leading));
                    if leading {
                        tracing::info!(queue = %leader, "active watcher of s3://{}/{}", rules.bucket, rules.prefix);
                    } else {
                        tracing::debug!(queue = %leader, "another watcher is active; standing by");
                    }
                }
                // Every watcher uploads its own local folder (each node's
                // scanner writes to its own); only the active one enqueues.
                // Both count as a job in flight: /healthz fails if one hangs.
                {
                    let _polling = crate::observe::InFlight::start();
                    if let Some(l) = local.as_mut() {
                        l.sync(&rules, &s3).await?;
                    }
                    if lease.is_some() {
                        report(&poll(&rules, &s3, &ch, &a.amqp, a.model_version.as_deref()).await?);
                    }
                }
                // A standby is healthy too: it checked the leadership.
                health.progress();
                tokio::time::sleep(interval).await;
            }
        };
        let ended = session.await;
        health.set_broker_connected(false);
        metrics.watch_active.set(0);
        match ended {
            Ok(_) => return Ok(()),
            Err(e) if a.once => return Err(e),
            Err(e) => {
                metrics.broker_reconnects.inc();
                tracing::warn!(error = %e, "watch session ended; reconnecting");
                tokio::time::sleep(interval).await;
            }
        }
    }
}

fn report(o: &PollOutcome) {
    for (job, slide) in &o.enqueued {
        println!("{job}\t{slide}");
    }
    let m = crate::observe::metrics();
    m.watch_slides("enqueued", o.enqueued.len());
    m.watch_slides("already", o.already);
    m.watch_slides("refused", o.refused.len());
    m.watch_waiting.set(o.waiting as i64);
    tracing::debug!(
        enqueued = o.enqueued.len(),
        already = o.already,
        waiting = o.waiting,
        refused = o.refused.len(),
        "poll"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(key: &str, etag: &str, t: i64) -> ListedObject {
        ListedObject {
            key: key.into(),
            etag: etag.into(),
            size: 1,
            modified_unix_s: t,
        }
    }

    fn rules(settle_s: u64, marker: Option<&str>, pattern: Option<&str>) -> Rules {
        Rules {
            bucket: "b".into(),
            prefix: "scans/".into(),
            settle_s,
            marker: marker.map(String::from),
            sidecar: "slide.json".into(),
            id_pattern: pattern.map(|p| regex::Regex::new(p).unwrap()),
            state_prefix: "cinflow-watch".into(),
        }
    }

    #[test]
    fn folders_with_images_are_slides_complete_by_marker_or_settle_time() {
        let r = rules(60, Some(".done"), None);
        let listing = vec![
            obj("cinflow-watch/abc.json", "e", 0),
            obj("scans/A/1.jpg", "e1", 100),
            obj("scans/A/2.TIF", "e2", 110),
            obj("scans/A/.done", "m", 120),
            obj("scans/B/1.jpg", "e3", 150),
            obj("scans/B/notes.txt", "e4", 300),
            obj("scans/C/slide.json", "e5", 100),
        ];
        let slides = r.slides(&listing);
        assert_eq!(slides.len(), 2, "{slides:?}");
        assert_eq!(slides[0].images.len(), 2);
        assert!(slides[0].marker);
        assert!(r.complete(&slides[0], 121));
        // B: no marker; complete 60 s after its newest object (notes.txt at 300).
        assert!(!r.complete(&slides[1], 359));
        assert!(r.complete(&slides[1], 360));
        assert!(!rules(0, Some(".done"), None).complete(&slides[1], 10_000));
    }

    #[test]
    fn the_version_changes_with_any_image_and_only_with_images() {
        let r = rules(60, Some(".done"), None);
        let a = r.slides(&[obj("scans/A/1.jpg", "e1", 1), obj("scans/A/2.jpg", "e2", 1)]);
        let same = r.slides(&[
            obj("scans/A/1.jpg", "e1", 9),
            obj("scans/A/2.jpg", "e2", 9),
            obj("scans/A/.done", "x", 9),
        ]);
        let replaced = r.slides(&[obj("scans/A/1.jpg", "e1", 1), obj("scans/A/2.jpg", "e9", 1)]);
        let added = r.slides(&[
            obj("scans/A/1.jpg", "e1", 1),
            obj("scans/A/2.jpg", "e2", 1),
            obj("scans/A/3.jpg", "e3", 1),
        ]);
        let v = a[0].version("b");
        assert_eq!(v, same[0].version("b"));
        assert_ne!(v, replaced[0].version("b"));
        assert_ne!(v, added[0].version("b"));
        assert_ne!(v, a[0].version("other-bucket"));
        let job = r.job(&a[0], r.ids(&a[0], None), None);
        assert_eq!(job.job_id, format!("watch-{}", &v[..32]));
        assert_eq!(job.slide_id, "A");
        assert!(job.validate().is_ok());
    }

    #[test]
    fn ids_come_from_the_sidecar_then_the_pattern_then_the_folder() {
        let r = rules(
            60,
            None,
            Some(r"^(?P<accession_id>S\d{2}-\d+)_(?P<slide_id>\w+)$"),
        );
        let s = &r.slides(&[obj("scans/S24-0117_A1/1.jpg", "e", 1)])[0];
        let ids = r.ids(s, None);
        assert_eq!(ids.accession_id.as_deref(), Some("S24-0117"));
        assert_eq!(ids.slide_id.as_deref(), Some("A1"));
        let sidecar = SlideIds {
            patient_id: Some("P-9".into()),
            slide_id: Some("A1-side".into()),
            ..Default::default()
        };
        let ids = r.ids(s, Some(sidecar));
        assert_eq!(ids.slide_id.as_deref(), Some("A1-side"));
        assert_eq!(ids.patient_id.as_deref(), Some("P-9"));
        assert_eq!(ids.accession_id.as_deref(), Some("S24-0117"));
        let plain = rules(60, None, None);
        assert_eq!(plain.ids(s, None).slide_id.as_deref(), Some("S24-0117_A1"));
        assert!(serde_json::from_str::<SlideIds>(r#"{"slide": "x"}"#).is_err());
    }
}
