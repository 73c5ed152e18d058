//! Fixtures for the queue-worker tests: a unique topology on the real RabbitMQ,
//! a model registry with a tiny bundle in the Garage bucket, images uploaded
//! there, and `cinflow worker` processes started from the built binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

use cinflow::model::Registry;
use cinflow::queue::messages::{JobMessage, JOB_SCHEMA};
use cinflow::queue::{
    confirm_channel, connect, declare_topology, delete_topology, publish_json, AmqpConfig,
};
use cinflow::result::ResultRecord;
use cinflow::storage::{ObjectStore, S3Config, S3Store};

pub struct Fixture {
    pub prefix: String,
    pub amqp: AmqpConfig,
    pub s3: S3Config,
    pub store: Arc<S3Store>,
    pub model: String,
    pub bundle: PathBuf,
    pub tmp: tempfile::TempDir,
    pub rt: tokio::runtime::Runtime,
    pub channel: lapin::Channel,
    _conn: lapin::Connection,
}

/// A started worker process; killed when dropped.
pub struct Worker {
    pub child: Child,
    pub log: PathBuf,
}

impl Worker {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// Waits for the process to exit; None if it is still running after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Objects of one job's complete result set with `images` images: the
/// claim, result.json, the FHIR report, the viewer page, and per image the
/// preprocessed image, the raw maps and the predicted class's overlay.
pub fn result_set_objects(images: usize) -> usize {
    1 + 3 + 3 * images
}

/// A copy of a bundle under another model name and version.
pub fn bundle_as_version(bundle: &Path, dir: &Path, name: &str, version: &str) -> PathBuf {
    super::copy_dir(bundle, dir);
    let path = dir.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    m["version"] = version.into();
    m["name"] = name.into();
    // A CIN2+ refer band, as `cinflow train` stores one (4- and 3-class), so
    // that results carry triage: fixed thresholds around the random head's
    // P(CIN2+).
    let cin2: Vec<&str> = match m["classes"].as_array().map_or(0, Vec::len) {
        4 => vec!["CIN3", "CIN2"],
        3 => vec!["CIN2-3"],
        _ => vec![],
    };
    if !cin2.is_empty() {
        let point = |threshold: f64, sensitivity: f64, specificity: f64| serde_json::json!({"threshold": threshold, "target": 0.95, "sensitivity": sensitivity, "specificity": specificity});
        m["refer_band"] = serde_json::json!({
            "classes": cin2,
            "fitted_on": "validation",
            "positives": 20,
            "negatives": 20,
            "rule_out": point(0.3, 0.95, 0.55),
            "rule_in": point(0.7, 0.6, 0.95),
        });
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    dir.to_path_buf()
}

impl Drop for Fixture {
    /// Deletes the test's queues and exchanges: quorum queues left behind would
    /// pile up in the shared broker run after run.
    fn drop(&mut self) {
        let events = format!("{}.events", self.prefix);
        self.rt.block_on(async {
            let _ = self
                .channel
                .queue_delete(events.as_str().into(), Default::default())
                .await;
            let _ = delete_topology(&self.channel, &self.amqp).await;
        });
    }
}

impl Fixture {
    /// A fresh topology and a registry whose `current` alias is the tiny
    /// `classes`-class bundle as version `v1`.
    pub fn new(what: &str, classes: u32) -> Fixture {
        Fixture::with_delivery_limit(what, classes, 3)
    }

    /// [`Fixture::new`] with queues that dead-letter after `limit` failed deliveries.
    pub fn with_delivery_limit(what: &str, classes: u32, limit: u32) -> Fixture {
        let prefix = super::unique_prefix(what);
        let amqp = AmqpConfig {
            heartbeat_s: 10,
            delivery_limit: limit,
            ..super::amqp_config(&prefix)
        };
        let s3 = super::s3_config();
        let store = Arc::new(S3Store::new(&s3).unwrap());
        let tmp = tempfile::tempdir().unwrap();
        let model = format!("{prefix}-cin{classes}");
        // The bundle's own name differs from the registry's, as when a lab
        // publishes an exported bundle under a name of its choosing: results
        // and claims must go by the registry's.
        let bundle = bundle_as_version(
            &super::tiny_bundle(classes),
            &tmp.path().join("v1"),
            &format!("bundle-{classes}class"),
            "v1",
        );
        let registry = Registry::new(store.clone(), &model).unwrap();
        registry.publish(&bundle).unwrap();
        registry.set_alias("current", "v1", "test fixture").unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (conn, channel) = rt.block_on(async {
            let conn = connect(&amqp, "cinflow-test").await.unwrap();
            let ch = confirm_channel(&conn).await.unwrap();
            declare_topology(&ch, &amqp).await.unwrap();
            // Every result event, for the assertions.
            ch.queue_declare(
                format!("{prefix}.events").as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
            ch.queue_bind(
                format!("{prefix}.events").as_str().into(),
                amqp.results_exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
            (conn, ch)
        });
        Fixture {
            prefix,
            amqp,
            s3,
            store,
            model,
            bundle,
            tmp,
            rt,
            channel,
            _conn: conn,
        }
    }

    pub fn registry(&self) -> Registry {
        Registry::new(self.store.clone(), &self.model).unwrap()
    }

    /// Uploads bytes under the test's prefix and returns the s3:// URI.
    pub fn put(&self, name: &str, bytes: &[u8]) -> String {
        let key = format!("{}/{name}", self.prefix);
        self.store.put(&key, bytes, "image/jpeg").unwrap();
        format!("s3://{}/{key}", self.s3.bucket)
    }

    /// Uploads `n` synthetic JPEGs of `w x h` and returns their URIs.
    pub fn images(&self, n: usize, w: u32, h: u32) -> Vec<String> {
        let dir = self.tmp.path().join(format!("images-{w}x{h}"));
        super::synth_images(&dir, n, w, h)
            .iter()
            .map(|p| {
                let name = format!(
                    "slides/{w}x{h}/{}",
                    p.file_name().unwrap().to_str().unwrap()
                );
                self.put(&name, &std::fs::read(p).unwrap())
            })
            .collect()
    }

    pub fn job(&self, id: &str, images: &[String]) -> JobMessage {
        JobMessage {
            schema: JOB_SCHEMA.into(),
            job_id: id.into(),
            slide_id: format!("slide-{id}"),
            images: images.to_vec(),
            model: None,
            accession_id: Some(format!("ACC-{id}")),
            patient_id: None,
            specimen_id: None,
        }
    }

    /// Publishes raw bytes as an inference job.
    pub fn publish_raw(&self, message_id: &str, body: &[u8]) {
        self.rt
            .block_on(publish_json(
                &self.channel,
                &self.amqp,
                &self.amqp.jobs_exchange,
                cinflow::queue::INFER_KEY,
                message_id,
                body,
                None,
            ))
            .unwrap();
    }

    pub fn publish(&self, job: &JobMessage) {
        self.publish_raw(&job.job_id, &serde_json::to_vec(job).unwrap());
    }

    /// `cinflow <args>` with this fixture's broker settings in its environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cinflow"));
        cmd.args(args)
            .current_dir(super::root())
            .env("CINFLOW_AMQP_URL", &self.amqp.url)
            .env("CINFLOW_JOBS_EXCHANGE", &self.amqp.jobs_exchange)
            .env("CINFLOW_INFER_QUEUE", &self.amqp.infer_queue)
            .env("CINFLOW_TRAIN_QUEUE", &self.amqp.train_queue)
            .env("CINFLOW_RESULTS_EXCHANGE", &self.amqp.results_exchange)
            .env(
                "CINFLOW_DELIVERY_LIMIT",
                self.amqp.delivery_limit.to_string(),
            );
        cmd
    }

    /// Waits until a worker has taken every message of `queue` (none ready).
    pub fn wait_taken(&self, queue: &str) {
        let t = Instant::now();
        while self.ready(queue) > 0 && t.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `cinflow worker <kind>` on this fixture's topology and registry.
    pub fn spawn(&self, kind: &str, extra: &[(&str, &str)]) -> Worker {
        self.spawn_command(&["worker", kind], extra)
    }

    /// Starts `cinflow <args>` as a long-running service (a worker, the LIS
    /// bridge) with this fixture's broker, bucket and registry settings.
    pub fn spawn_command(&self, args: &[&str], extra: &[(&str, &str)]) -> Worker {
        let name: String = args
            .iter()
            .take(2)
            .flat_map(|a| a.chars())
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        let log = self
            .tmp
            .path()
            .join(format!("{name}-{}.log", super::unique_prefix("w")));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = self.command(args);
        cmd.env("CINFLOW_AMQP_HEARTBEAT_S", "10")
            .env("CINFLOW_S3_BUCKET", &self.s3.bucket)
            .env("CINFLOW_S3_ATTEMPTS", "2")
            .env("CINFLOW_S3_BACKOFF_MS", "100")
            .env("CINFLOW_S3_TIMEOUT_S", "5")
            .env("CINFLOW_MODEL_NAME", &self.model)
            .env("CINFLOW_MODEL_POLL_S", "1")
            .env("CINFLOW_MODEL_CACHE", self.tmp.path().join("model-cache"))
            .env("CINFLOW_RESULTS_PREFIX", format!("{}/results", self.prefix))
            .env(
                "CINFLOW_TRAIN_RESULTS_PREFIX",
                format!("{}/train-results", self.prefix),
            )
            .env(
                "CINFLOW_FEATURE_PREFIX",
                format!("{}/features", self.prefix),
            )
            .env("CINFLOW_RETRY_FOR_S", "60")
            .env("CINFLOW_RETRY_BACKOFF_MS", "200")
            .env("CINFLOW_RETRY_BACKOFF_MAX_MS", "2000")
            .env("CINFLOW_DRAIN_TIMEOUT_S", "30")
            .env("CINFLOW_DEVICE", "cpu")
            .env("CINFLOW_INTRA_THREADS", "1")
            // Many workers run at once: each serves /metrics on a free port.
            .env("CINFLOW_METRICS_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file));
        for (k, v) in extra {
            cmd.env(k, v);
        }
        Worker {
            child: cmd.spawn().expect("start cinflow worker"),
            log,
        }
    }

    pub fn result_key(&self, job_id: &str, version: &str) -> String {
        format!(
            "{}/results/{job_id}/{}/{version}/result.json",
            self.prefix, self.model
        )
    }

    pub fn result(&self, job_id: &str, version: &str) -> Option<ResultRecord> {
        match self.store.get(&self.result_key(job_id, version)) {
            Ok(b) => Some(serde_json::from_slice(&b).unwrap()),
            Err(e) if e.is_not_found() => None,
            Err(e) => panic!("{e}"),
        }
    }

    /// Waits for a job's result.
    pub fn wait_result(&self, job_id: &str, version: &str, w: &Worker) -> ResultRecord {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(120) {
            if let Some(r) = self.result(job_id, version) {
                return r;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "no result for {job_id} after 120 s; worker log:\n{}",
            w.log()
        );
    }

    /// Local-mode grades of the same bytes as `r`'s images, with the same
    /// bundle and at most `max_batch` images per backbone call: the
    /// independent check of a worker's result.
    pub fn grade_locally(
        &self,
        r: &ResultRecord,
        max_batch: usize,
    ) -> Vec<cinflow::result::ImageResult> {
        let dir = self.tmp.path().join(format!(
            "local-{}-{max_batch}",
            r.job_id.as_deref().unwrap()
        ));
        let inputs: Vec<PathBuf> = r
            .images
            .iter()
            .enumerate()
            .map(|(i, img)| {
                let key = img
                    .uri
                    .split_once(&format!("{}/", self.s3.bucket))
                    .unwrap()
                    .1;
                let p = dir.join(format!("in/{i:03}.jpg"));
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, self.store.get(key).unwrap()).unwrap();
                p
            })
            .collect();
        let mut o = super::classify_options(&self.bundle, &dir.join("out"), inputs);
        o.grader.max_batch = max_batch;
        let local = cinflow::local::classify(&o).unwrap();
        local.results.into_iter().map(|(_, r)| r).collect()
    }

    /// Waits for a job's result and checks that it graded every image and
    /// left exactly one result set of `images` images.
    pub fn wait_graded(&self, job_id: &str, images: usize, w: &Worker) -> ResultRecord {
        let r = self.wait_result(job_id, "v1", w);
        assert_eq!(
            r.status,
            cinflow::result::ImageStatus::Ok,
            "{job_id}: {:?}",
            r.error
        );
        let objects = self.result_objects(job_id);
        assert_eq!(
            objects.len(),
            result_set_objects(images),
            "{job_id}: {objects:#?}"
        );
        r
    }

    /// Every object under a job's results.
    pub fn result_objects(&self, job_id: &str) -> Vec<String> {
        self.store
            .list(&format!("{}/results/{job_id}/", self.prefix))
            .unwrap()
    }

    /// Takes one message from a queue (waiting up to `limit`).
    pub fn get(&self, queue: &str, limit: Duration) -> Option<lapin::message::BasicGetMessage> {
        self.rt.block_on(async {
            let t = Instant::now();
            loop {
                if let Some(m) = self
                    .channel
                    .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                    .await
                    .unwrap()
                {
                    return Some(m);
                }
                if t.elapsed() >= limit {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }

    /// The result events received so far: (routing key, body).
    pub fn events(&self) -> Vec<(String, serde_json::Value)> {
        let mut out = Vec::new();
        while let Some(m) = self.get(&format!("{}.events", self.prefix), Duration::ZERO) {
            out.push((
                m.delivery.routing_key.to_string(),
                serde_json::from_slice(&m.delivery.data).unwrap(),
            ));
        }
        out
    }

    /// Messages in the inference dead-letter queue: (message id, reason, body).
    pub fn dead_letters(&self, expect: usize) -> Vec<(String, String, Vec<u8>)> {
        self.dead_letters_in(&self.amqp.infer_dlq(), expect)
    }

    /// Messages in a dead-letter queue, waiting up to a minute for `expect`
    /// of them: (message id, reason, body).
    pub fn dead_letters_in(&self, dlq: &str, expect: usize) -> Vec<(String, String, Vec<u8>)> {
        let mut out = Vec::new();
        let t = Instant::now();
        while out.len() < expect && t.elapsed() < Duration::from_secs(60) {
            if let Some(m) = self.get(dlq, Duration::from_millis(500)) {
                let p = &m.delivery.properties;
                let reason = p
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get(cinflow::worker::REASON_HEADER).cloned())
                    .map(|v| match v {
                        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into(),
                        other => format!("{other:?}"),
                    })
                    .unwrap_or_default();
                out.push((
                    p.message_id()
                        .as_ref()
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                    reason,
                    m.delivery.data.clone(),
                ));
            }
        }
        out
    }

    /// Messages ready in a queue (not counting unacknowledged ones).
    pub fn ready(&self, queue: &str) -> u32 {
        self.rt.block_on(async {
            let q = self
                .channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            q.message_count()
        })
    }
}

/// The broker connection of a worker process, closed from the broker's side.
pub fn close_broker_connection(pid: u32) {
    close_broker_connection_named(pid, "");
}

/// A broker connection of a worker process, closed from the broker's side:
/// the one whose name ends in `suffix` after the process id (`""`: the
/// consuming connection, `" (publishing)"`: the publishing one).
pub fn close_broker_connection_named(pid: u32, suffix: &str) {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let needle = format!(":{pid}{suffix}\"");
    let conn = text
        .lines()
        .find(|l| l.contains("cinflow-infer@") && l.contains(&needle))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no broker connection of worker {pid} in:\n{text}"))
        .to_string();
    let ok = Command::new("rabbitmqctl")
        .args(["close_connection", &conn, "test: connection dropped"])
        .status()
        .unwrap()
        .success();
    assert!(ok, "rabbitmqctl close_connection {conn}");
}
