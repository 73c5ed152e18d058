//! The S3 server goes away and comes back: a write in progress keeps retrying
//! with backoff and lands once the server is back, nothing written before is
//! lost, and an inference worker finishes the job it was fetching images for.
//! Its own test binary, because it stops the shared Garage server; the tests
//! here take turns.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use cinflow::storage::{ObjectStore, S3Store};

static OUTAGE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn garage(action: &str) {
    common::output_ok(
        Command::new("bash")
            .arg(common::root().join("scripts/garage.sh"))
            .arg(action),
    );
}

#[test]
fn writes_survive_an_s3_outage() {
    let _turn = OUTAGE.lock().unwrap_or_else(|e| e.into_inner());
    let mut cfg = common::s3_config();
    cfg.attempts = 10;
    cfg.backoff_ms = 250;
    cfg.timeout_s = 3;
    let s = S3Store::new(&cfg).unwrap();
    let p = common::unique_prefix("outage");
    s.put(&format!("{p}/before"), b"before", "text/plain")
        .unwrap();

    garage("stop");
    let restart = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(3));
        garage("start");
    });
    let t = Instant::now();
    let written = s.put(&format!("{p}/during"), b"during", "text/plain");
    restart.join().unwrap();
    written.expect("the write lands once S3 is back");
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "the write cannot have landed while the server was down"
    );
    assert_eq!(s.get(&format!("{p}/before")).unwrap(), b"before");
    assert_eq!(s.get(&format!("{p}/during")).unwrap(), b"during");
}

#[test]
fn a_worker_finishes_its_job_across_an_s3_outage() {
    let _turn = OUTAGE.lock().unwrap_or_else(|e| e.into_inner());
    let fx = common::worker::Fixture::new("s3down", 4);
    let img = fx.images(2, 640, 480);
    let w = fx.spawn("infer", &[]);
    fx.publish(&fx.job("before", &img));
    fx.wait_result("before", "v1", &w);

    garage("stop");
    fx.publish(&fx.job("during", &img));
    std::thread::sleep(Duration::from_secs(4));
    garage("start");
    let r = fx.wait_result("during", "v1", &w);
    assert_eq!(r.status, cinflow::result::ImageStatus::Ok);
    assert!(w.log().contains("retrying"), "{}", w.log());
    assert!(fx
        .get(&fx.amqp.infer_dlq(), Duration::from_secs(1))
        .is_none());
}

#[test]
fn jobs_outlast_an_s3_outage_longer_than_the_retry_budget() {
    let _turn = OUTAGE.lock().unwrap_or_else(|e| e.into_inner());
    let fx = common::worker::Fixture::new("s3long", 4);
    let img = fx.images(1, 640, 480);
    // A retry budget of one second, rounds of two: the outage lasts several
    // rounds, more than the delivery limit (3).
    let w = fx.spawn(
        "infer",
        &[("CINFLOW_RETRY_FOR_S", "1"), ("CINFLOW_RETRY_DELAY_S", "2")],
    );
    fx.publish(&fx.job("before", &img));
    fx.wait_result("before", "v1", &w);

    garage("stop");
    for id in ["during-1", "during-2", "during-3"] {
        fx.publish(&fx.job(id, &img));
    }
    std::thread::sleep(Duration::from_secs(12));
    garage("start");
    for id in ["during-1", "during-2", "during-3"] {
        let r = fx.wait_result(id, "v1", &w);
        assert_eq!(r.status, cinflow::result::ImageStatus::Ok);
    }
    let rounds = w.log().matches("job delayed").count();
    assert!(rounds >= 3 * 3, "{rounds} rounds:\n{}", w.log());
    assert!(
        fx.get(&fx.amqp.infer_dlq(), Duration::from_secs(1))
            .is_none(),
        "a job was dead-lettered because of the outage:\n{}",
        w.log()
    );
}
