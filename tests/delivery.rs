//! Delivery guarantees of the inference worker, against the real RabbitMQ and
//! Garage: one result per job (claims), failures counted the same on every
//! broker version (reject, delay queue, given-back copies), bounded memory,
//! message limits, deadlines and liveness.

mod common;

use std::time::{Duration, Instant};

use lapin::types::{AMQPValue, FieldTable};

use cinflow::result::ImageStatus;
use cinflow::storage::ObjectStore;
use common::faulty_s3::FaultyS3;
use common::http::{free_port, get, sample};
use common::worker::{bundle_as_version, result_set_objects, Fixture, Worker};

/// Waits up to `limit` for `ok`; whether it came.
fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ok()
}

fn claim_key(fx: &Fixture, job: &str) -> String {
    format!("{}/results/{job}/claim.json", fx.prefix)
}

fn header(h: &FieldTable, name: &str) -> Option<i64> {
    match h.inner().get(name)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        other => panic!("{name}: {other:?}"),
    }
}

/// A worker reading S3 through `proxy`.
fn spawn_via(fx: &Fixture, proxy: &FaultyS3, extra: &[(&str, &str)]) -> Worker {
    let endpoint = proxy.endpoint();
    let mut env = vec![("CINFLOW_S3_ENDPOINT", endpoint.as_str())];
    env.extend_from_slice(extra);
    fx.spawn("infer", &env)
}

#[test]
fn a_redelivery_after_a_model_promotion_keeps_the_claimed_version() {
    let fx = Fixture::new("pin", 4);
    let slide = fx.images(6, 2560, 1920);
    let one = fx.images(1, 640, 480);
    let mut a = fx.spawn("infer", &[("CINFLOW_CONCURRENCY", "1")]);
    fx.publish(&fx.job("pinned", &slide));
    // The first delivery claims the job for v1; kill it right after.
    let claimed = wait_until(Duration::from_secs(60), || {
        fx.store.exists(&claim_key(&fx, "pinned")).unwrap()
    });
    assert!(claimed, "no claim; worker log:\n{}", a.log());
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(10)).expect("killed");

    // v2 is promoted before the redelivery is taken.
    let v2 = bundle_as_version(&fx.bundle, &fx.tmp.path().join("v2"), &fx.model, "v2");
    let registry = fx.registry();
    registry.publish(&v2).unwrap();
    registry
        .set_alias("current", "v2", "test: promoted")
        .unwrap();
    let b = fx.spawn("infer", &[]);
    let r = fx.wait_result("pinned", "v1", &b);
    assert_eq!(r.status, ImageStatus::Ok);
    assert_eq!(r.model.version, "v1");
    // New jobs go to v2; the pinned one never does.
    fx.publish(&fx.job("after", &one));
    assert_eq!(fx.wait_result("after", "v2", &b).model.version, "v2");
    assert!(fx.result("pinned", "v2").is_none());
    let objects = fx.result_objects("pinned");
    assert!(
        objects
            .iter()
            .all(|k| k.ends_with("/claim.json") || k.contains("/v1/")),
        "{objects:#?}"
    );
    assert_eq!(objects.len(), result_set_objects(6), "{objects:#?}");
    // Whatever was announced for the job names v1.
    let events = fx.events();
    let pinned: Vec<_> = events
        .iter()
        .filter(|(_, e)| e["job_id"] == "pinned")
        .collect();
    assert!(!pinned.is_empty());
    assert!(
        pinned.iter().all(|(_, e)| e["model"]["version"] == "v1"),
        "{pinned:#?}"
    );
}

#[test]
fn a_complete_job_is_announced_again_and_a_reused_job_id_is_refused() {
    let fx = Fixture::new("once", 4);
    let img = fx.images(2, 640, 480);
    let w = fx.spawn("infer", &[]);
    fx.publish(&fx.job("once", &img));
    fx.wait_result("once", "v1", &w);
    let key = fx.result_key("once", "v1");
    let stored = fx.store.get(&key).unwrap();

    // The same job again (formatted differently): announced, not graded again.
    let same = serde_json::to_vec_pretty(&fx.job("once", &img)).unwrap();
    fx.publish_raw("once", &same);
    assert!(
        wait_until(Duration::from_secs(30), || w
            .log()
            .contains("announcing its result again")),
        "{}",
        w.log()
    );
    // Another content under the same id: dead-lettered, nothing rewritten.
    fx.publish(&fx.job("once", &img[..1]));
    let dl = fx.dead_letters(1);
    assert_eq!(dl.len(), 1, "{}", w.log());
    assert!(
        dl[0].1.contains("duplicate job_id with different content"),
        "{}",
        dl[0].1
    );
    assert_eq!(
        fx.store.get(&key).unwrap(),
        stored,
        "the result was rewritten"
    );
    let events: Vec<_> = fx
        .events()
        .into_iter()
        .filter(|(_, e)| e["job_id"] == "once")
        .collect();
    assert_eq!(events.len(), 2, "{events:#?}");
    assert_eq!(
        events[0].1, events[1].1,
        "a second, different result was announced"
    );
    assert_eq!(
        events[1].1,
        serde_json::from_slice::<serde_json::Value>(&stored).unwrap()
    );
}

#[test]
fn messages_beyond_the_workers_limits_are_refused_with_reasons() {
    let fx = Fixture::new("limits", 4);
    let img = fx.images(1, 640, 480);
    let w = fx.spawn("infer", &[("CINFLOW_MAX_MESSAGE_BYTES", "2000")]);
    let mut other = fx.job("other-bucket", &img);
    other.images = vec!["s3://someone-elses-bucket/slides/a.jpg".into()];
    fx.publish(&other);
    let mut big = fx.job("too-big", &img);
    big.images = (0..40).map(|i| format!("{}-{i}", img[0])).collect();
    fx.publish(&big);
    let dots = serde_json::json!({"schema": "cinflow.job/v1", "job_id": "..", "slide_id": "s", "images": img});
    fx.publish_raw("dots", &serde_json::to_vec(&dots).unwrap());
    let mut dl = fx.dead_letters(3);
    dl.sort();
    assert_eq!(dl.len(), 3, "{}", w.log());
    let reason = |id: &str| dl.iter().find(|d| d.0 == id).unwrap().1.clone();
    let r = reason("other-bucket");
    assert!(
        r.contains("images[0]")
            && r.contains("someone-elses-bucket")
            && r.contains("--allowed-buckets"),
        "{r}"
    );
    let r = reason("too-big");
    assert!(
        r.contains("at most 2000") && r.contains("--max-message-bytes"),
        "{r}"
    );
    let r = reason("dots");
    assert!(r.contains("job_id") && r.contains("object key"), "{r}");
    // Each left an error result; nothing was read from the other bucket.
    assert_eq!(
        fx.result("other-bucket", "v1").unwrap().status,
        ImageStatus::Error
    );
    // Refused at validation: no image was fetched or graded.
    assert!(!w.log().contains("fetch failed"), "{}", w.log());
    assert!(!w.log().contains("job graded"), "{}", w.log());
}

#[test]
fn a_drained_job_comes_back_without_a_failure_counted() {
    let fx = Fixture::new("drain", 4);
    let proxy = FaultyS3::start(&common::s3_config().endpoint.unwrap());
    let img = fx.images(2, 640, 480);
    // The job is held in its first GET when the worker is stopped.
    proxy.delay("GET", "/slides/", 100, Duration::from_secs(30));
    let mut w = spawn_via(&fx, &proxy, &[("CINFLOW_DRAIN_TIMEOUT_S", "0")]);
    fx.publish(&fx.job("drained", &img));
    fx.wait_taken(&fx.amqp.infer_queue);
    assert!(wait_until(Duration::from_secs(30), || proxy
        .count("GET", "/slides/")
        > 0));
    w.signal("TERM");
    let status = w.wait_exit(Duration::from_secs(30)).expect("stopped");
    assert!(status.success(), "{}", w.log());
    // Back in the queue as a copy: no failure, one delivery, no broker count.
    let m = fx
        .get(&fx.amqp.infer_queue, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the job was not given back:\n{}", w.log()));
    let h = m.delivery.properties.headers().clone().unwrap_or_default();
    assert_eq!(header(&h, "x-cinflow-failures"), Some(0), "{h:?}");
    assert_eq!(header(&h, "x-cinflow-deliveries"), Some(1), "{h:?}");
    assert_eq!(header(&h, "x-delivery-count").unwrap_or(0), 0, "{h:?}");
    assert_eq!(
        m.delivery.data,
        serde_json::to_vec(&fx.job("drained", &img)).unwrap()
    );
}

#[test]
fn transient_failures_wait_in_the_delay_queue_and_never_make_poison() {
    let fx = Fixture::new("delay", 4);
    let proxy = FaultyS3::start(&common::s3_config().endpoint.unwrap());
    let img = fx.images(1, 640, 480);
    // Every GET of the image fails for a while: more rounds than the delivery limit (3).
    proxy.fail("GET", "/slides/", 14, 503);
    let w = spawn_via(
        &fx,
        &proxy,
        &[("CINFLOW_RETRY_FOR_S", "1"), ("CINFLOW_RETRY_DELAY_S", "2")],
    );
    let t = Instant::now();
    fx.publish(&fx.job("flaky", &img));
    let r = fx.wait_result("flaky", "v1", &w);
    assert_eq!(r.status, ImageStatus::Ok, "{}", w.log());
    let rounds = w.log().matches("job delayed").count();
    assert!(rounds >= 4, "{rounds} rounds:\n{}", w.log());
    // Each round waited out the delay.
    assert!(
        t.elapsed() >= Duration::from_secs(2 * rounds as u64),
        "{:?} for {rounds} rounds",
        t.elapsed()
    );
    assert!(fx
        .get(&fx.amqp.infer_dlq(), Duration::from_secs(1))
        .is_none());
}

#[test]
fn a_job_that_fails_every_delivery_is_dead_lettered_as_poison() {
    let fx = Fixture::new("poison", 4);
    let proxy = FaultyS3::start(&common::s3_config().endpoint.unwrap());
    let img = fx.images(1, 640, 480);
    // Every fetch is slower than the job deadline.
    proxy.delay("GET", "/slides/", 100, Duration::from_secs(4));
    let w = spawn_via(&fx, &proxy, &[("CINFLOW_JOB_TIMEOUT_S", "1")]);
    fx.publish(&fx.job("stuck", &img));
    let dl = fx.dead_letters(1);
    assert_eq!(dl.len(), 1, "{}", w.log());
    assert!(
        dl[0].1.contains("poison message: 3 failed deliveries"),
        "{}",
        dl[0].1
    );
    assert!(w.log().contains("--job-timeout-s"), "{}", w.log());
    let r = fx.result("stuck", "v1").expect("an error result");
    assert_eq!(r.status, ImageStatus::Error);
}

#[test]
fn jobs_stop_when_the_connection_is_lost_and_health_fails_when_stalled() {
    let fx = Fixture::new("liveness", 4);
    let proxy = FaultyS3::start(&common::s3_config().endpoint.unwrap());
    let img = fx.images(1, 640, 480);
    proxy.delay("GET", "/slides/", 100, Duration::from_secs(6));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let w = spawn_via(
        &fx,
        &proxy,
        &[
            ("CINFLOW_CONCURRENCY", "1"),
            ("CINFLOW_METRICS_ADDR", addr.as_str()),
            ("CINFLOW_STALL_LIMIT_S", "2"),
            ("CINFLOW_S3_TIMEOUT_S", "30"),
        ],
    );
    fx.publish(&fx.job("slow-1", &img));
    fx.publish(&fx.job("slow-2", &img));
    assert!(wait_until(Duration::from_secs(60), || {
        get(port, "/metrics").is_some_and(|m| sample(&m.1, "cinflow_jobs_in_flight") >= 1.0)
    }));
    // Wedged in a GET for longer than the stall limit: /healthz fails.
    assert!(
        wait_until(Duration::from_secs(5), || {
            get(port, "/healthz")
                .is_some_and(|(code, body)| code == 503 && body.contains("stalled"))
        }),
        "{:?}",
        get(port, "/healthz")
    );
    common::worker::close_broker_connection(w.pid());
    // After the reconnect, never more jobs in flight than --concurrency.
    let t = Instant::now();
    let mut most = 0.0f64;
    while t.elapsed() < Duration::from_secs(8) {
        if let Some((_, m)) = get(port, "/metrics") {
            most = most.max(sample(&m, "cinflow_jobs_in_flight"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(most <= 1.0, "{most} jobs in flight with --concurrency 1");
    assert!(w.log().contains("reconnecting"), "{}", w.log());
    // Both jobs still finish, once each.
    assert_eq!(fx.wait_result("slow-1", "v1", &w).status, ImageStatus::Ok);
    assert_eq!(fx.wait_result("slow-2", "v1", &w).status, ImageStatus::Ok);
    assert!(wait_until(Duration::from_secs(10), || get(
        port, "/healthz"
    )
    .is_some_and(|(code, _)| code == 200)));
}

/// A 10000 x 10000 JPEG (smooth colours with a little noise).
fn huge_jpeg(w: u32, h: u32) -> Vec<u8> {
    use rand::Rng;
    let mut rng = rand::rng();
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let n: u8 = rng.random_range(0..8);
        image::Rgb([
            (x * 200 / w) as u8 + n,
            (y * 200 / h) as u8 + n,
            ((x + y) * 100 / (w + h)) as u8 + 60,
        ])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80)
        .encode_image(&img)
        .unwrap();
    out
}

fn kib(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} not in {status}"))
}

#[test]
fn huge_images_are_admitted_within_the_memory_budget() {
    let fx = Fixture::new("budget", 4);
    let bytes = huge_jpeg(10_000, 10_000);
    let slide: Vec<String> = (0..8)
        .map(|i| fx.put(&format!("slides/huge/{i}.jpg"), &bytes))
        .collect();
    let budget_mib = 1000u64;
    let w = fx.spawn(
        "infer",
        &[
            ("CINFLOW_CONCURRENCY", "2"),
            ("CINFLOW_MEMORY_BUDGET_MB", "1000"),
        ],
    );
    // The model is loaded and warm once the worker consumes.
    assert!(wait_until(Duration::from_secs(60), || w
        .log()
        .contains("consuming")));
    let status = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let model_kib = kib(&status(w.pid()), "VmHWM:");
    fx.publish(&fx.job("huge", &slide));
    let r = fx.wait_result("huge", "v1", &w);
    assert_eq!(r.status, ImageStatus::Ok, "{:?}", r.error);
    let peak_kib = kib(&status(w.pid()), "VmHWM:");
    let used_mib = (peak_kib - model_kib) / 1024;
    eprintln!(
        "peak RSS {} MiB, of which {used_mib} MiB above the loaded model; budget {budget_mib} MiB",
        peak_kib / 1024
    );
    assert!(
        used_mib <= budget_mib,
        "{used_mib} MiB above the model's memory, budget {budget_mib} MiB"
    );

    // One image larger than the whole budget is refused, not retried.
    let small = fx.spawn("infer", &[("CINFLOW_MEMORY_BUDGET_MB", "300")]);
    drop(w);
    fx.publish(&fx.job("over-budget", &slide[..1]));
    let dl = fx.dead_letters(1);
    assert_eq!(dl.len(), 1, "{}", small.log());
    assert!(
        dl[0].1.contains("10000x10000") && dl[0].1.contains("--memory-budget-mb"),
        "{}",
        dl[0].1
    );
}

#[test]
fn twenty_kills_during_thirty_jobs_lose_nothing_and_grade_nothing_twice() {
    use rand::{Rng, SeedableRng};
    // A limit no job reaches here: every kill counts against the jobs in flight.
    let fx = Fixture::with_delivery_limit("storm", 4, 40);
    let pool = fx.images(6, 2560, 1920);
    let jobs: Vec<String> = (0..30).map(|i| format!("storm-{i:02}")).collect();
    for (i, id) in jobs.iter().enumerate() {
        let slide: Vec<String> = (0..3).map(|k| pool[(i + k) % pool.len()].clone()).collect();
        fx.publish(&fx.job(id, &slide));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20);
    // The first result.json seen of each job: it must never change.
    let mut first: std::collections::HashMap<String, Vec<u8>> = Default::default();
    let snapshot = |first: &mut std::collections::HashMap<String, Vec<u8>>| {
        for id in &jobs {
            if let Ok(b) = fx.store.get(&fx.result_key(id, "v1")) {
                let seen = first.entry(id.clone()).or_insert_with(|| b.clone());
                assert_eq!(*seen, b, "{id} was graded again after it completed");
            }
        }
    };
    let mut kills = 0;
    while kills < 20 {
        let mut w = fx.spawn("infer", &[]);
        assert!(
            wait_until(Duration::from_secs(60), || w.log().contains("consuming")),
            "{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(rng.random_range(0..1500)));
        w.signal("KILL");
        w.wait_exit(Duration::from_secs(10)).expect("killed");
        kills += 1;
        snapshot(&mut first);
    }
    eprintln!("{} of 30 jobs complete after 20 kills", first.len());
    let w = fx.spawn("infer", &[]);
    for id in &jobs {
        fx.wait_graded(id, 3, &w);
    }
    std::thread::sleep(Duration::from_secs(1));
    snapshot(&mut first);
    assert!(fx
        .get(&fx.amqp.infer_dlq(), Duration::from_secs(1))
        .is_none());
    assert_eq!(fx.ready(&fx.amqp.infer_queue), 0);
}

#[test]
fn a_refused_read_is_never_retried() {
    let fx = Fixture::new("denied", 4);
    let proxy = FaultyS3::start(&common::s3_config().endpoint.unwrap());
    let img = fx.images(1, 640, 480);
    proxy.fail("GET", "/slides/", 1, 403);
    let w = spawn_via(&fx, &proxy, &[]);
    fx.publish(&fx.job("denied", &img));
    let dl = fx.dead_letters(1);
    assert_eq!(dl.len(), 1, "{}", w.log());
    assert!(dl[0].1.contains("AccessDenied"), "{}", dl[0].1);
    assert_eq!(proxy.count("GET", "/slides/"), 1, "retried:\n{}", w.log());
}

#[test]
fn a_refused_job_is_graded_once_requeued_whatever_serialised_it() {
    let fx = Fixture::new("requeue-py", 4);
    let img = fx.images(1, 640, 480);
    // Serialised by Python's json.dumps (", " and ": " separators, its own
    // key order) and published by pika with its defaults (no message id),
    // as a lab's own script would.
    let script = r#"
import json, sys, pika
url, exchange, key, image = sys.argv[1:5]
body = json.dumps({'slide_id': 's-py', 'job_id': 'from-python', 'images': [image],
                   'schema': 'cinflow.job/v1', 'accession_id': 'ACC-py'})
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
ch.confirm_delivery()
ch.basic_publish(exchange, key, body.encode(), pika.BasicProperties(delivery_mode=2), mandatory=True)
conn.close()
print(body, end='')
"#;
    let body = common::output_ok(std::process::Command::new("/usr/bin/python3").args([
        "-c",
        script,
        &fx.amqp.url,
        &fx.amqp.jobs_exchange,
        cinflow::queue::INFER_KEY,
        &img[0],
    ]));
    assert!(body.contains("\", \""), "{body}");
    // A worker that may not read the images' bucket refuses the job.
    let mut w = fx.spawn("infer", &[("CINFLOW_ALLOWED_BUCKETS", "some-other-bucket")]);
    let refused = fx.wait_result("from-python", "v1", &w);
    assert_eq!(refused.status, ImageStatus::Error);
    assert!(
        refused
            .error
            .as_deref()
            .unwrap_or("")
            .contains("--allowed-buckets"),
        "{:?}",
        refused.error
    );
    assert!(wait_until(Duration::from_secs(30), || fx
        .ready(&fx.amqp.infer_dlq())
        == 1));
    w.signal("TERM");
    w.wait_exit(Duration::from_secs(30)).expect("stopped");

    // The operator fixes the configuration and sends the job back.
    let w = fx.spawn("infer", &[]);
    let out = fx
        .command(&["dead-letters", "requeue", "--all"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(60), || fx
            .result("from-python", "v1")
            .is_some_and(|r| r.status == ImageStatus::Ok)),
        "not graded after the requeue:\n{}",
        w.log()
    );
    let r = fx.wait_graded("from-python", 1, &w);
    assert_eq!(r.ids.accession_id.as_deref(), Some("ACC-py"));
    assert!(fx
        .get(&fx.amqp.infer_dlq(), Duration::from_secs(1))
        .is_none());
}

#[test]
fn a_results_prefix_that_refuses_writes_dead_letters_the_job_without_a_loop() {
    let fx = Fixture::new("noperm", 4);
    let proxy = FaultyS3::start(&common::s3_config().endpoint.unwrap());
    let img = fx.images(1, 640, 480);
    // Every write under the results prefix is refused, as a bucket policy
    // or a quota would.
    proxy.fail("PUT", "/results/", 10_000, 403);
    let w = spawn_via(
        &fx,
        &proxy,
        &[
            ("CINFLOW_RETRY_DELAY_S", "1"),
            ("CINFLOW_RETRY_ROUNDS", "3"),
        ],
    );
    fx.publish(&fx.job("noperm", &img));
    let dl = fx.dead_letters(1);
    assert_eq!(dl.len(), 1, "{}", w.log());
    assert!(dl[0].1.contains("AccessDenied"), "{}", dl[0].1);
    assert!(dl[0].1.contains("could not be written"), "{}", dl[0].1);
    // Dead-lettered at once: never a round through the delay queue.
    assert!(!w.log().contains("job delayed"), "{}", w.log());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(fx.ready(&fx.amqp.infer_queue), 0);
    assert!(fx.get(&fx.amqp.infer_dlq(), Duration::ZERO).is_none());
}

#[test]
fn a_lost_connection_costs_the_job_in_flight_nothing() {
    // A delivery limit of one: a single return held against the job would
    // make it poison.
    let fx = Fixture::with_delivery_limit("reconnect", 4, 1);
    let proxy = FaultyS3::start(&common::s3_config().endpoint.unwrap());
    let img = fx.images(1, 640, 480);
    proxy.delay("GET", "/slides/", 1, Duration::from_secs(4));
    // One job at a time: no quarantine lane to forgive the return.
    let w = spawn_via(&fx, &proxy, &[("CINFLOW_CONCURRENCY", "1")]);
    fx.publish(&fx.job("cut-off", &img));
    assert!(wait_until(Duration::from_secs(60), || proxy
        .count("GET", "/slides/")
        >= 1));
    common::worker::close_broker_connection(w.pid());
    let r = fx.wait_graded("cut-off", 1, &w);
    assert_eq!(r.status, ImageStatus::Ok);
    assert!(
        w.log().contains("not counting the returns of this job"),
        "{}",
        w.log()
    );
    assert!(fx
        .get(&fx.amqp.infer_dlq(), Duration::from_secs(1))
        .is_none());
}
