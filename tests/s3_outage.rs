//! The S3 server goes away and comes back: a write in progress keeps retrying
//! with backoff and lands once the server is back, and nothing written before
//! is lost. Its own test binary, because it stops the shared Garage server.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use cinflow::storage::{ObjectStore, S3Store};

fn garage(action: &str) {
    let out = Command::new("bash")
        .arg(common::root().join("scripts/garage.sh"))
        .arg(action)
        .output()
        .expect("run scripts/garage.sh");
    assert!(
        out.status.success(),
        "garage.sh {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn writes_survive_an_s3_outage() {
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
