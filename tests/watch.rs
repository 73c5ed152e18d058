//! `cinflow watch` against the real Garage and RabbitMQ: slides that scanners
//! upload while two watchers run are enqueued once each, a slide still being
//! uploaded is not enqueued early, the standby watcher takes over when the
//! active one is killed, a restarted watcher enqueues nothing twice, a
//! replaced image grades the slide again as a new version, and a slide without
//! a marker is complete once it settles.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::worker::Fixture;
use serde_json::Value;

struct Watcher {
    child: Child,
    log: std::path::PathBuf,
}

impl Watcher {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn watch_command(fx: &Fixture, extra: &[&str]) -> Command {
    let scans = format!("s3://{}/{}/scans/", fx.s3.bucket, fx.prefix);
    let state = format!("{}/watch-state", fx.prefix);
    let mut cmd = fx.command(&["watch", "--prefix", &scans, "--state-prefix", &state]);
    cmd.args(extra)
        .env("CINFLOW_S3_BUCKET", &fx.s3.bucket)
        .env("CINFLOW_METRICS_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "info");
    cmd
}

fn spawn(fx: &Fixture, name: &str) -> Watcher {
    let log = fx.tmp.path().join(format!("{name}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let child = watch_command(
        fx,
        &[
            "--interval-s",
            "1",
            "--settle-s",
            "3600",
            "--id-pattern",
            r"^(?P<accession_id>S\d{2}-\d+)_(?P<slide_id>\w+)$",
        ],
    )
    .stdout(Stdio::from(file.try_clone().unwrap()))
    .stderr(Stdio::from(file))
    .spawn()
    .expect("start cinflow watch");
    Watcher { child, log }
}

/// Waits until the infer queue holds `n` messages, then checks it stays there
/// for a few polls.
fn expect_jobs(fx: &Fixture, n: u32, watchers: &[&Watcher]) {
    let t = Instant::now();
    while fx.ready(&fx.amqp.infer_queue) < n && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    let have = fx.ready(&fx.amqp.infer_queue);
    let logs: Vec<String> = watchers.iter().map(|w| w.log()).collect();
    assert_eq!(
        have,
        n,
        "jobs in the queue; watcher logs:\n{}",
        logs.join("\n----\n")
    );
}

fn jpeg(seed: u64) -> Vec<u8> {
    let img = cinflow::synth::render(cinflow::synth::Grade::Cin2, 640, 480, seed);
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

#[test]
fn watchers_enqueue_each_complete_slide_version_exactly_once() {
    let fx = Fixture::new("watch", 4);
    // Slide A is complete (marker) with a sidecar; slide B is still being uploaded.
    let a = "scans/S24-0117_A1";
    fx.put(&format!("{a}/1.jpg"), &jpeg(1));
    fx.put(&format!("{a}/2.jpg"), &jpeg(2));
    fx.put(
        &format!("{a}/slide.json"),
        br#"{"patient_id": "P-42", "specimen_id": "SP-7"}"#,
    );
    fx.put(&format!("{a}/.done"), b"");
    let b = "scans/S24-0118_B1";
    fx.put(&format!("{b}/1.jpg"), &jpeg(3));

    // Two watchers at once: one is active, A is enqueued once, B not yet.
    let w1 = spawn(&fx, "w1");
    let w2 = spawn(&fx, "w2");
    expect_jobs(&fx, 1, &[&w1, &w2]);
    let active = [&w1, &w2]
        .iter()
        .filter(|w| w.log().contains("active watcher"))
        .count();
    assert_eq!(
        active,
        1,
        "exactly one active watcher:\n{}\n----\n{}",
        w1.log(),
        w2.log()
    );

    // The active one dies; B's upload completes: the standby takes over.
    let (mut leader, standby) = if w1.log().contains("active watcher") {
        (w1, w2)
    } else {
        (w2, w1)
    };
    leader.child.kill().unwrap();
    leader.child.wait().unwrap();
    fx.put(&format!("{b}/2.jpg"), &jpeg(4));
    fx.put(&format!("{b}/.done"), b"");
    expect_jobs(&fx, 2, &[&standby]);
    assert!(
        standby.log().contains("active watcher"),
        "{}",
        standby.log()
    );

    // Its probes and metrics: ready, active, one slide enqueued.
    let log = standby.log();
    let port: u16 = log
        .split("metrics and probes on http://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in\n{log}"));
    assert_eq!(common::http::get(port, "/readyz").unwrap().0, 200);
    assert_eq!(common::http::get(port, "/healthz").unwrap().0, 200);
    let metrics = common::http::get(port, "/metrics").unwrap().1;
    assert_eq!(
        common::http::sample(&metrics, "cinflow_watch_active"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        common::http::sample(&metrics, "cinflow_watch_slides_total{outcome=\"enqueued\"}"),
        1.0,
        "{metrics}"
    );

    // A restarted watcher enqueues nothing again.
    drop(leader);
    let restarted = spawn(&fx, "w3");
    std::thread::sleep(Duration::from_secs(3));
    expect_jobs(&fx, 2, &[&standby, &restarted]);

    // A replaced image is a new version of A: graded again under a new job id.
    fx.put(&format!("{a}/2.jpg"), &jpeg(5));
    expect_jobs(&fx, 3, &[&standby, &restarted]);
    drop(standby);
    drop(restarted);

    let jobs: Vec<Value> = (0..3)
        .map(|_| {
            let m = fx
                .get(&fx.amqp.infer_queue, Duration::from_secs(5))
                .unwrap();
            serde_json::from_slice(&m.data).unwrap()
        })
        .collect();
    let a_jobs: Vec<&Value> = jobs.iter().filter(|j| j["slide_id"] == "A1").collect();
    let b_jobs: Vec<&Value> = jobs.iter().filter(|j| j["slide_id"] == "B1").collect();
    assert_eq!((a_jobs.len(), b_jobs.len()), (2, 1), "{jobs:#?}");
    for j in &jobs {
        assert!(j["job_id"].as_str().unwrap().starts_with("watch-"), "{j}");
        cinflow::queue::messages::JobMessage::parse(&serde_json::to_vec(j).unwrap()).unwrap();
    }
    assert_ne!(a_jobs[0]["job_id"], a_jobs[1]["job_id"]);
    // Ids: accession and slide from the folder name, patient and specimen from the sidecar.
    assert_eq!(a_jobs[0]["accession_id"], "S24-0117");
    assert_eq!(a_jobs[0]["patient_id"], "P-42");
    assert_eq!(a_jobs[0]["specimen_id"], "SP-7");
    assert_eq!(a_jobs[0]["images"].as_array().unwrap().len(), 2);
    assert_eq!(b_jobs[0]["accession_id"], "S24-0118");
    assert_eq!(b_jobs[0]["images"].as_array().unwrap().len(), 2);
    // Each enqueued version has its state object.
    let states =
        cinflow::storage::ObjectStore::list(&*fx.store, &format!("{}/watch-state/", fx.prefix))
            .unwrap();
    assert_eq!(states.len(), 3, "{states:?}");

    // Without a marker a slide is complete once it has settled; --once polls
    // once, and a second run finds it enqueued already.
    let c = "scans/S24-0119_C1";
    fx.put(&format!("{c}/1.jpg"), &jpeg(6));
    std::thread::sleep(Duration::from_secs(3));
    let once = |settle: &str| {
        let out = watch_command(&fx, &["--once", "--marker", "", "--settle-s", settle])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(once("3600"), "", "not settled yet");
    let printed = once("2");
    assert!(printed.contains("\tS24-0119_C1\n"), "{printed}");
    assert_eq!(once("2"), "", "enqueued once");
    assert_eq!(fx.ready(&fx.amqp.infer_queue), 1);

    // A bad sidecar is named and the slide left alone; bad flags are usage errors.
    let d = "scans/S24-0120_D1";
    fx.put(&format!("{d}/1.jpg"), &jpeg(7));
    fx.put(&format!("{d}/slide.json"), br#"{"patient": "typo"}"#);
    fx.put(&format!("{d}/.done"), b"");
    let out = watch_command(&fx, &["--once"]).output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("slide.json is not valid") && err.contains("unknown field"),
        "{err}"
    );
    let out = watch_command(&fx, &["--once", "--id-pattern", "(?P<doctor>x)"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--local-dir`: settled files of a scanner's folder are uploaded (the marker
/// last, only once every image is up) and the slide is enqueued in the same
/// run; a file still being written is left for later; nothing is uploaded or
/// enqueued twice.
#[test]
fn a_local_scanner_folder_is_uploaded_then_enqueued_once() {
    let fx = Fixture::new("watch-local", 4);
    let dir = fx.tmp.path().join("scanner");
    let slide = dir.join("S24-0200_L1");
    std::fs::create_dir_all(&slide).unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(60);
    let write = |name: &str, bytes: &[u8], settled: bool| {
        let p = slide.join(name);
        std::fs::write(&p, bytes).unwrap();
        if settled {
            std::fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
    };
    write("1.jpg", &jpeg(11), true);
    write("2.jpg", &jpeg(12), false); // still being written
    write("3.jpg.part", b"partial", true);
    write(".done", b"", true);
    let run = || {
        let out = watch_command(
            &fx,
            &[
                "--once",
                "--local-dir",
                dir.to_str().unwrap(),
                "--local-min-age-s",
                "30",
            ],
        )
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let keys = || {
        cinflow::storage::ObjectStore::list(&*fx.store, &format!("{}/scans/", fx.prefix)).unwrap()
    };
    // 1.jpg goes up; 2.jpg is too young, so the marker waits and nothing is enqueued.
    assert_eq!(run(), "");
    let k = keys();
    assert_eq!(k.len(), 1, "{k:?}");
    assert!(k[0].ends_with("/scans/S24-0200_L1/1.jpg"));
    // Once 2.jpg has settled, it and then the marker go up and the slide is enqueued.
    std::fs::File::options()
        .write(true)
        .open(slide.join("2.jpg"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    let printed = run();
    assert!(printed.contains("\tS24-0200_L1\n"), "{printed}");
    assert_eq!(keys().len(), 3, "{:?}", keys());
    assert_eq!(run(), "");
    assert_eq!(fx.ready(&fx.amqp.infer_queue), 1);
    let job: Value = serde_json::from_slice(
        &fx.get(&fx.amqp.infer_queue, Duration::from_secs(5))
            .unwrap()
            .data,
    )
    .unwrap();
    assert_eq!(job["images"].as_array().unwrap().len(), 2);
    // The uploaded bytes are the files'.
    let key = format!("{}/scans/S24-0200_L1/2.jpg", fx.prefix);
    assert_eq!(
        cinflow::storage::ObjectStore::get(&*fx.store, &key).unwrap(),
        std::fs::read(slide.join("2.jpg")).unwrap()
    );
}
