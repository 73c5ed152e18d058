//! The LIS side of the bridge tests: a stand-in LIS built from independent
//! libraries (tools/lis_peer.py) and `cinflow lis-bridge` processes.

use std::io::BufRead;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::worker::{Fixture, Worker};

/// The stand-in LIS; killed when dropped.
pub struct Peer {
    child: Child,
    log: PathBuf,
    pub mllp: u16,
    pub http: u16,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Peer {
    pub fn start(dir: &Path, token_file: &Path) -> Peer {
        let (mllp, http) = (super::http::free_port(), super::http::free_port());
        let log = dir.join("lis-peer.jsonl");
        let mut child = Command::new(super::python())
            .arg(super::root().join("tools/lis_peer.py"))
            .args(["--mllp-port", &mllp.to_string()])
            .args(["--http-port", &http.to_string()])
            .arg("--log")
            .arg(&log)
            .arg("--token-file")
            .arg(token_file)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start tools/lis_peer.py");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        assert_eq!(line.trim(), "ready", "lis_peer.py did not start");
        Peer {
            child,
            log,
            mllp,
            http,
        }
    }

    pub fn entries(&self, kind: &str) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|e| e["kind"] == kind)
            .collect()
    }

    /// HL7 messages received for the order `accession`.
    pub fn hl7_of(&self, accession: &str) -> Vec<Value> {
        self.entries("hl7")
            .into_iter()
            .filter(|e| {
                e["text"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("|{accession}|"))
            })
            .collect()
    }

    /// FHIR Bundles received for the report whose identifier is `report_id`.
    pub fn fhir_of(&self, report_id: &str) -> Vec<Value> {
        self.entries("fhir")
            .into_iter()
            .filter(|e| {
                e["bundle"]
                    .to_string()
                    .contains(&format!("\"{report_id}\""))
            })
            .collect()
    }

    pub fn control(&self, query: &str) {
        let (status, _) = super::http::get(self.http, &format!("/_control?{query}")).unwrap();
        assert_eq!(status, 200);
    }

    pub fn store(&self) -> Value {
        let (status, body) = super::http::get(self.http, "/_store").unwrap();
        assert_eq!(status, 200);
        serde_json::from_str(&body).unwrap()
    }
}

/// Deletes the bridge's queue with its delay and dead-letter queues.
pub fn delete_bridge_queues(fx: &Fixture, queue: &str) {
    fx.rt
        .block_on(cinflow::queue::delete_subscription(
            &fx.channel,
            &cinflow::queue::Subscription {
                queue: queue.to_string(),
                exchange: fx.amqp.results_exchange.clone(),
                keys: vec![],
            },
        ))
        .unwrap();
}

pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts `cinflow lis-bridge` on `queue` delivering to `peer` (with `extra`
/// settings in its environment) and waits until it is ready.
pub fn start_bridge(
    fx: &Fixture,
    peer: &Peer,
    queue: &str,
    token: &Path,
    metrics: u16,
    extra: &[(&str, &str)],
) -> Worker {
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let w = fx.spawn_command(
        &[
            "lis-bridge",
            "--lis-queue",
            queue,
            "--hl7-mllp",
            &format!("127.0.0.1:{}", peer.mllp),
            "--hl7-patient-authority",
            "LAB",
            "--hl7-ack-timeout-s",
            "60",
            "--fhir-base",
            &format!("http://127.0.0.1:{}/fhir", peer.http),
            "--fhir-token-file",
            token.to_str().unwrap(),
            "--link-lifetime-s",
            "3600",
        ],
        &[
            ("CINFLOW_METRICS_ADDR", metrics_addr.as_str()),
            ("CINFLOW_RETRY_FOR_S", "20"),
            ("CINFLOW_RETRY_BACKOFF_MS", "100"),
            ("CINFLOW_RETRY_BACKOFF_MAX_MS", "500"),
            ("CINFLOW_RETRY_DELAY_S", "1"),
        ]
        .iter()
        .chain(extra)
        .copied()
        .collect::<Vec<_>>(),
    );
    wait_for("the bridge to be ready", Duration::from_secs(60), || {
        (super::http::get(metrics, "/readyz").map(|r| r.0) == Some(200)).then_some(())
    });
    w
}
