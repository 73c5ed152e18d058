//! The worker's HTTP endpoints against the real RabbitMQ and Garage: `/healthz`
//! answers while the model is still loading, `/readyz` turns ready only once
//! the model is loaded and warmed up and drops while the broker connection is
//! away, and `/metrics` moves as jobs run (outcomes, stage histograms, queue
//! wait, retries, dead-letters, the served model).
//!
//! S3 reaches the worker through a gate in this test that can refuse and cut
//! connections, so "not loaded yet" and "transient failure" are real ones.

mod common;

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::http::{free_port, get, sample};
use common::worker::{close_broker_connection, Fixture};

/// A TCP forwarder to S3 that can be closed (new connections dropped, open
/// ones cut) and opened again.
struct Gate {
    port: u16,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Gate {
    fn start(target: SocketAddr) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (o, c) = (open.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if !o.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let mut list = c.lock().unwrap();
                list.push(client.try_clone().unwrap());
                list.push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        Gate { port, open, conns }
    }

    fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
        if !open {
            for s in self.conns.lock().unwrap().drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool, log: impl Fn() -> String) {
    let t = Instant::now();
    while t.elapsed() < limit {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within {limit:?}; worker log:\n{}", log());
}

#[test]
fn health_readiness_and_metrics_follow_the_worker() {
    let fx = Fixture::new("observe", 4);
    let s3 = fx
        .s3
        .endpoint
        .clone()
        .expect("CINFLOW_S3_ENDPOINT is set by make test");
    let target = s3
        .trim_start_matches("http://")
        .to_socket_addrs()
        .unwrap()
        .next()
        .unwrap();
    let gate = Gate::start(target);
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{}", gate.port);
    let addr = format!("127.0.0.1:{port}");
    let w = fx.spawn(
        "infer",
        &[
            ("CINFLOW_S3_ENDPOINT", endpoint.as_str()),
            ("CINFLOW_METRICS_ADDR", addr.as_str()),
            // The first reconnect waits 1 s: long enough to see the worker
            // unready after rabbitmqctl (a slow CLI) has closed its connection.
            ("CINFLOW_RETRY_BACKOFF_MS", "1000"),
            ("CINFLOW_RETRY_BACKOFF_MAX_MS", "3000"),
            ("CINFLOW_LOG_FORMAT", "json"),
        ],
    );
    let log = || w.log();

    // S3 is away: the process is live but not ready, and says why.
    wait_for(
        "/healthz",
        Duration::from_secs(30),
        || get(port, "/healthz").is_some_and(|r| r.0 == 200),
        log,
    );
    std::thread::sleep(Duration::from_secs(1));
    let (code, body) = get(port, "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["model_loaded"], false);
    let m = get(port, "/metrics").unwrap().1;
    assert_eq!(sample(&m, "cinflow_ready"), 0.0, "{m}");
    assert!(!m.contains("cinflow_model_info{"), "{m}");
    assert_eq!(get(port, "/nothing").unwrap().0, 404);

    // S3 back: the model loads, warms up, and the worker turns ready.
    gate.set_open(true);
    wait_for(
        "ready",
        Duration::from_secs(90),
        || get(port, "/readyz").is_some_and(|r| r.0 == 200),
        log,
    );
    let m = get(port, "/metrics").unwrap().1;
    assert!(m.contains("version=\"v1\""), "{m}");
    assert_eq!(sample(&m, "cinflow_broker_connected"), 1.0);
    assert_eq!(sample(&m, "cinflow_ready"), 1.0);
    assert!(
        m.contains("# TYPE cinflow_job_duration_seconds histogram"),
        "{m}"
    );

    // One good slide and one bad image: the metrics move.
    let slide = fx.images(2, 640, 480);
    let broken = fx.put("slides/broken/1.jpg", b"not an image");
    fx.publish(&fx.job("obs-good", &slide));
    fx.publish(&fx.job("obs-bad", &[broken]));
    fx.wait_result("obs-good", "v1", &w);
    fx.wait_result("obs-bad", "v1", &w);
    let mut m = String::new();
    wait_for(
        "both jobs settled in the metrics",
        Duration::from_secs(30),
        || {
            m = get(port, "/metrics").unwrap().1;
            sample(&m, "cinflow_jobs_total{outcome=\"done\"}") == 1.0
                && sample(&m, "cinflow_jobs_total{outcome=\"rejected\"}") == 1.0
        },
        log,
    );
    assert_eq!(
        sample(&m, "cinflow_dead_letters_total{cause=\"rejected\"}"),
        1.0
    );
    assert_eq!(sample(&m, "cinflow_images_total{outcome=\"graded\"}"), 2.0);
    assert_eq!(sample(&m, "cinflow_images_total{outcome=\"error\"}"), 1.0);
    for stage in cinflow::observe::STAGES {
        assert_eq!(
            sample(
                &m,
                &format!("cinflow_stage_duration_seconds_count{{stage=\"{stage}\"}}")
            ),
            2.0,
            "{stage}: {m}"
        );
    }
    assert_eq!(sample(&m, "cinflow_queue_wait_seconds_count"), 2.0);
    assert_eq!(sample(&m, "cinflow_job_duration_seconds_count"), 2.0);
    assert_eq!(sample(&m, "cinflow_jobs_in_flight"), 0.0);
    let predicted: f64 = m
        .lines()
        .filter(|l| l.starts_with("cinflow_predictions_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(predicted, 2.0, "{m}");
    // Every bucket line of the infer stage is cumulative and ends at the count.
    let buckets: Vec<f64> = m
        .lines()
        .filter(|l| {
            l.starts_with("cinflow_stage_duration_seconds_bucket{") && l.contains("stage=\"infer\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(buckets.len(), cinflow::observe::STAGE_BUCKETS.len() + 1);
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]) && buckets.last() == Some(&2.0));

    // S3 cut while a job fetches: the failure is retried (and counted), the
    // job still finishes once S3 is back.
    gate.set_open(false);
    let more = vec![slide[0].clone()];
    fx.publish(&fx.job("obs-retried", &more));
    wait_for(
        "a retry",
        Duration::from_secs(30),
        || {
            sample(
                &get(port, "/metrics").unwrap().1,
                // The job's first read: its claim.
                "cinflow_retries_total{step=\"read claim\"}",
            ) >= 1.0
        },
        log,
    );
    gate.set_open(true);
    fx.wait_result("obs-retried", "v1", &w);

    // The broker connection drops: not ready until the worker is back.
    close_broker_connection(w.pid());
    wait_for(
        "not ready without the broker",
        Duration::from_secs(10),
        || get(port, "/readyz").is_some_and(|r| r.0 == 503),
        log,
    );
    wait_for(
        "ready again",
        Duration::from_secs(30),
        || get(port, "/readyz").is_some_and(|r| r.0 == 200),
        log,
    );
    assert!(
        sample(
            &get(port, "/metrics").unwrap().1,
            "cinflow_broker_reconnects_total"
        ) >= 1.0
    );

    // JSON logs: one object per line, and a job's lines carry its ids.
    let text = w.log();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines.len() > 5, "{text}");
    let graded = lines
        .iter()
        .find(|l| l["fields"]["message"] == "job graded" && l["span"]["job_id"] == "obs-good")
        .unwrap_or_else(|| panic!("no JSON line of obs-good with its span:\n{text}"));
    assert_eq!(graded["span"]["slide_id"], "slide-obs-good");
}
