//! The broker misbehaving as a whole: RabbitMQ restarted (`rabbitmqctl
//! stop_app` / `start_app`) while a worker grades jobs (it reconnects within
//! seconds of the broker and every job finishes once), a memory alarm that
//! blocks publishers (a bare publish gives up after `--confirm-timeout-s`
//! instead of hanging; a worker waits it out without counting it against
//! its jobs), and a dropped publishing connection. Its own test binary, because it takes the shared
//! broker away from everything else; the tests here take turns.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use cinflow::result::ImageStatus;
use cinflow::storage::ObjectStore;
use common::http::{free_port, get, sample};
use common::worker::Fixture;

static BROKER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the RabbitMQ app again when dropped (also while unwinding a panic).
struct StartOnDrop;

impl Drop for StartOnDrop {
    fn drop(&mut self) {
        for args in [&["start_app"][..], &["await_startup"][..]] {
            let _ = std::process::Command::new("rabbitmqctl")
                .args(args)
                .output();
        }
    }
}

#[test]
fn a_worker_resumes_after_a_broker_restart_and_every_job_finishes_once() {
    let _turn = BROKER.lock().unwrap_or_else(|e| e.into_inner());
    let fx = Fixture::new("restart", 4);
    let slide = fx.images(3, 1280, 960);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let w = fx.spawn(
        "infer",
        &[
            ("CINFLOW_METRICS_ADDR", addr.as_str()),
            ("CINFLOW_RETRY_BACKOFF_MAX_MS", "1000"),
        ],
    );
    let jobs: Vec<String> = (0..12).map(|i| format!("restart-{i:02}")).collect();
    for id in &jobs {
        fx.publish(&fx.job(id, &slide));
    }
    let first = fx.wait_result(&jobs[0], "v1", &w);
    assert_eq!(first.status, ImageStatus::Ok);
    let done_before: Vec<(String, Vec<u8>)> = jobs
        .iter()
        .filter_map(|id| Some((id.clone(), fx.store.get(&fx.result_key(id, "v1")).ok()?)))
        .collect();

    rabbitmqctl(&["stop_app"]);
    // Whatever happens below, the broker is started again: a failed assertion
    // must not leave it stopped for the tests that follow.
    let _restart = StartOnDrop;
    let ready = |port| get(port, "/readyz").is_some_and(|(code, _)| code == 200);
    // The worker notices the lost connection within a few seconds (sooner on
    // an idle machine); it must stop being ready within 15.
    let down = Instant::now();
    while ready(port) && down.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!ready(port), "ready while the broker is down");
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);
    let back = Instant::now();
    while !ready(port) && back.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let resumed = back.elapsed();
    eprintln!("the worker was ready again {resumed:?} after the broker");
    assert!(
        resumed <= Duration::from_secs(10),
        "resumed after {resumed:?}:\n{}",
        w.log()
    );

    for id in &jobs {
        fx.wait_graded(id, 3, &w);
    }
    // Jobs finished before the restart were not graded again.
    std::thread::sleep(Duration::from_secs(1));
    for (id, before) in &done_before {
        let now = fx.store.get(&fx.result_key(id, "v1")).unwrap();
        assert_eq!(&now, before, "{id} was graded again");
    }
    // The fixture's own connection died with the broker: clean up on a new one.
    let amqp = fx.amqp.clone();
    fx.rt.block_on(async {
        let conn = cinflow::queue::connect(&amqp, "cinflow-test-cleanup")
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                amqp.infer_queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .unwrap();
        assert_eq!(q.message_count(), 0, "jobs left in the queue");
        let _ = ch
            .queue_delete(
                format!("{}.events", fx.prefix).as_str().into(),
                Default::default(),
            )
            .await;
        cinflow::queue::delete_topology(&ch, &amqp).await.unwrap();
    });
}

/// Lifts the memory alarm when dropped, even if the test fails.
struct Alarm;

impl Alarm {
    fn raise() -> Alarm {
        rabbitmqctl(&["set_vm_memory_high_watermark", "absolute", "1"]);
        Alarm
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]);
    }
}

#[test]
fn a_publish_to_a_blocked_broker_gives_up_after_the_confirm_timeout() {
    let _turn = BROKER.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = cinflow::queue::AmqpConfig {
        confirm_timeout_s: 2,
        ..common::amqp_config(&common::unique_prefix("alarm"))
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let conn = cinflow::queue::connect(&cfg, "cinflow-test").await.unwrap();
        let ch = cinflow::queue::confirm_channel(&conn).await.unwrap();
        cinflow::queue::declare_topology(&ch, &cfg).await.unwrap();
        let alarm = Alarm::raise();
        let t = Instant::now();
        let e = cinflow::queue::publish_json(
            &ch,
            &cfg,
            &cfg.jobs_exchange,
            cinflow::queue::INFER_KEY,
            "blocked",
            b"{}",
            None,
        )
        .await
        .unwrap_err();
        let took = t.elapsed();
        drop(alarm);
        assert!(
            matches!(e, cinflow::queue::QueueError::ConfirmTimeout { .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("--confirm-timeout-s"), "{e}");
        assert!(cinflow::retry::Transient::is_transient(&e));
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(10),
            "{took:?}"
        );
        // Once the alarm is gone the broker takes messages again.
        let conn = cinflow::queue::connect(&cfg, "cinflow-test").await.unwrap();
        let ch = cinflow::queue::confirm_channel(&conn).await.unwrap();
        cinflow::queue::delete_topology(&ch, &cfg).await.unwrap();
    });
}

/// The worker's job counters: (done, failed, quarantined).
fn settled(port: u16) -> (f64, f64, f64) {
    let m = get(port, "/metrics").map(|(_, m)| m).unwrap_or_default();
    let n = |o: &str| sample(&m, &format!("cinflow_jobs_total{{outcome=\"{o}\"}}"));
    (n("done"), n("failed"), n("quarantined"))
}

/// `jobs` published to a worker (with `extra` settings and its metrics on
/// the returned port) whose image fetches take 3 s each, and taken: the
/// jobs are in their GETs when the test strikes.
fn slow_jobs_taken(
    fx: &Fixture,
    jobs: &[&str],
    extra: &[(&str, &str)],
) -> (common::faulty_s3::FaultyS3, common::worker::Worker, u16) {
    let proxy = common::faulty_s3::FaultyS3::start(&common::s3_config().endpoint.unwrap());
    let img = fx.images(1, 640, 480);
    proxy.delay("GET", "/slides/", jobs.len(), Duration::from_secs(3));
    let endpoint = proxy.endpoint();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let concurrency = jobs.len().to_string();
    let mut env = vec![
        ("CINFLOW_S3_ENDPOINT", endpoint.as_str()),
        ("CINFLOW_METRICS_ADDR", addr.as_str()),
        ("CINFLOW_CONCURRENCY", concurrency.as_str()),
    ];
    env.extend_from_slice(extra);
    let w = fx.spawn("infer", &env);
    for id in jobs {
        fx.publish(&fx.job(id, &img));
    }
    fx.wait_taken(&fx.amqp.infer_queue);
    (proxy, w, port)
}

#[test]
fn a_long_memory_alarm_costs_no_job_a_delivery() {
    let _turn = BROKER.lock().unwrap_or_else(|e| e.into_inner());
    let fx = Fixture::new("blocked", 4);
    let jobs = ["blocked-1", "blocked-2", "blocked-3"];
    let (_proxy, w, port) = slow_jobs_taken(
        &fx,
        &jobs,
        &[
            ("CINFLOW_CONFIRM_TIMEOUT_S", "2"),
            ("CINFLOW_RETRY_FOR_S", "2"),
            ("CINFLOW_RETRY_ROUNDS", "2"),
            ("CINFLOW_JOB_TIMEOUT_S", "6"),
        ],
    );
    let alarm = Alarm::raise();
    // Far longer than a confirm, the retries of a publish, the retry rounds
    // and the job deadline: before, each of these would have counted
    // against the jobs or given them up.
    std::thread::sleep(Duration::from_secs(25));
    // The results are written; their events wait for the broker.
    for id in jobs {
        assert!(fx.result(id, "v1").is_some(), "{id}:\n{}", w.log());
    }
    assert_eq!(settled(port), (0.0, 0.0, 0.0), "{}", w.log());
    drop(alarm);
    for id in jobs {
        let r = fx.wait_graded(id, 1, &w);
        assert_eq!(r.attempt, Some(1), "{id} was delivered again");
    }
    let t = Instant::now();
    while settled(port).0 < 3.0 && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(settled(port), (3.0, 0.0, 0.0), "{}", w.log());
    assert!(w.log().contains("held up"), "{}", w.log());
    let events = fx.events();
    for id in jobs {
        assert!(
            events
                .iter()
                .any(|(k, e)| k == "result.ok" && e["job_id"] == id),
            "{id}: {events:?}"
        );
    }
    assert_eq!(fx.ready(&fx.amqp.infer_dlq()), 0);
}

#[test]
fn a_dropped_publishing_connection_costs_no_job_a_delivery() {
    let _turn = BROKER.lock().unwrap_or_else(|e| e.into_inner());
    let fx = Fixture::new("droppub", 4);
    let jobs = ["droppub-1", "droppub-2"];
    let (_proxy, w, port) = slow_jobs_taken(&fx, &jobs, &[]);
    // Only the publishing connection goes: the consuming one keeps the jobs.
    common::worker::close_broker_connection_named(w.pid(), " (publishing)");
    for id in jobs {
        let r = fx.wait_graded(id, 1, &w);
        assert_eq!(r.attempt, Some(1), "{id} was delivered again");
    }
    let t = Instant::now();
    while settled(port).0 < 2.0 && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(settled(port), (2.0, 0.0, 0.0), "{}", w.log());
    assert!(
        w.log().contains("publishing connection open again"),
        "{}",
        w.log()
    );
    assert_eq!(fx.ready(&fx.amqp.infer_dlq()), 0);
}
