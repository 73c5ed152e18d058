//! `cinflow worker train` as a process: `cinflow enqueue-train` publishes a job
//! whose labels manifest and images are in the Garage bucket; the worker stages
//! them, caches features in the bucket, trains the head with libtorch, publishes
//! the new version to the S3 registry with its report and promotion decision,
//! records the outcome, announces it and acks. A second run reuses the cached
//! features. A job naming a labels file that does not exist is dead-lettered
//! with the reason.
#![cfg(feature = "train")]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use cinflow::storage::ObjectStore;
use common::worker::Fixture;

fn upload_dir(fx: &Fixture, dir: &Path, root: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            upload_dir(fx, &p, root);
        } else {
            let rel = p
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .replace('\\', "/");
            fx.put(&format!("data/{rel}"), &std::fs::read(&p).unwrap());
        }
    }
}

fn enqueue_train(fx: &Fixture, labels: &str) -> String {
    common::output_ok(&mut fx.command(&[
        "enqueue-train",
        "--labels",
        labels,
        "--model-name",
        &fx.model,
        "--set",
        "max_epochs=40",
        "--set",
        "early_stopping_start=5",
        "--set",
        "patience=5",
        "--set",
        "learning_rate=0.01",
    ]))
    .trim()
    .to_string()
}

fn wait_outcome(fx: &Fixture, job: &str, w: &common::worker::Worker) -> serde_json::Value {
    let key = format!("{}/train-results/{job}.json", fx.prefix);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(300) {
        match fx.store.get(&key) {
            Ok(b) => return serde_json::from_slice(&b).unwrap(),
            Err(e) if e.is_not_found() => std::thread::sleep(Duration::from_millis(500)),
            Err(e) => panic!("{e}"),
        }
    }
    panic!("no training outcome for {job}:\n{}", w.log());
}

/// 48 synthetic images of 16 patients with their labels manifest, in the bucket.
fn dataset(fx: &Fixture) -> String {
    let data = fx.tmp.path().join("data");
    cinflow::synth::generate(
        &cinflow::synth::SynthOptions {
            out: data.clone(),
            n: 48,
            width: 400,
            height: 300,
            seed: 5,
            format: cinflow::synth::SynthFormat::Jpeg,
            images_per_patient: 3,
        },
        None,
    )
    .unwrap();
    upload_dir(fx, &data, &data);
    format!("s3://{}/{}/data/labels.csv", fx.s3.bucket, fx.prefix)
}

#[test]
fn the_training_worker_retrains_from_s3_and_records_the_decision() {
    let fx = Fixture::new("trainw", 4);
    let labels = dataset(&fx);

    let port = common::http::free_port();
    let addr = format!("127.0.0.1:{port}");
    let w = fx.spawn(
        "train",
        &[
            ("CINFLOW_TRAIN_DEVICE", "cpu"),
            ("CINFLOW_TRAIN_TEST_FRACTION", "0.25"),
            ("CINFLOW_METRICS_ADDR", addr.as_str()),
        ],
    );
    // The training worker serves the same endpoints: ready once connected.
    let t = Instant::now();
    while common::http::get(port, "/readyz").map(|r| r.0) != Some(200) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "never ready:\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let job = enqueue_train(&fx, &labels);
    let first = wait_outcome(&fx, &job, &w);
    assert_eq!(first["status"], "ok", "{first:#}\n{}", w.log());
    let version = first["version"].as_str().unwrap().to_string();
    assert_eq!(first["features_computed"], 48);
    let registry = fx.registry();
    assert!(registry.versions().unwrap().contains(&version));
    let decision = registry
        .decision(&version)
        .unwrap()
        .expect("decision recorded");
    assert_eq!(first["decision"]["promoted"], decision.promoted);
    let alias = registry.alias("current").unwrap().unwrap();
    assert_eq!(alias.version == version, decision.promoted, "{decision:?}");
    let report = registry.get_file(&version, "report/report.html").unwrap();
    assert!(String::from_utf8_lossy(&report).contains("<html"));
    let events = fx.events();
    assert!(
        events
            .iter()
            .any(|(k, e)| k == "train.ok" && e["job_id"] == job.as_str()),
        "{events:?}"
    );

    // Sign-outs in the manifest, as `cinflow lis-bridge` writes them: four
    // cases (12 images) signed out now, after the parent version was made,
    // and one (3 images) in 2020.
    let key = labels
        .strip_prefix(&format!("s3://{}/", fx.s3.bucket))
        .unwrap();
    let text = String::from_utf8(fx.store.get(key).unwrap()).unwrap();
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut lines = text.lines();
    let mut signed = format!("{},accession_id,signed_out_at\n", lines.next().unwrap());
    for (i, line) in lines.enumerate() {
        let extra = match i / 3 {
            0..=3 => format!("ACC-{},{now}", i / 3),
            4 => "ACC-OLD,2020-01-01T00:00:00Z".to_string(),
            _ => ",".to_string(),
        };
        signed.push_str(&format!("{line},{extra}\n"));
    }
    fx.store.put(key, signed.as_bytes(), "text/csv").unwrap();

    // Again: every feature comes from the S3 cache.
    let job2 = enqueue_train(&fx, &labels);
    let second = wait_outcome(&fx, &job2, &w);
    assert_eq!(second["status"], "ok", "{second:#}");
    assert_eq!(second["features_cached"], 48);
    // The next report counts the signed-out cases and those new since the parent.
    let v2 = second["version"].as_str().unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&registry.get_file(v2, "report/report.json").unwrap()).unwrap();
    let so = &report["data"]["signed_out"];
    assert_eq!(
        (so["cases"].as_u64(), so["images"].as_u64()),
        (Some(5), Some(15)),
        "{so}"
    );
    assert_eq!(so["added_since_parent"]["cases"], 4, "{so}");
    assert_eq!(so["added_since_parent"]["images"], 12, "{so}");
    let html = String::from_utf8(registry.get_file(v2, "report/report.html").unwrap()).unwrap();
    assert!(
        html.contains("<b>4 cases (12 images) added since the parent version</b>"),
        "{html}"
    );
    // The outcomes and their events follow the repo's schema.
    let mut outcomes = vec![first.clone(), second.clone()];
    outcomes.extend(
        events
            .iter()
            .filter(|(k, _)| k.starts_with("train."))
            .map(|(_, e)| e.clone()),
    );
    common::assert_valid(Some("train-result.v1.schema.json"), &outcomes);
    // Both jobs counted once settled (the ack follows the outcome).
    let t = Instant::now();
    loop {
        let m = common::http::get(port, "/metrics").unwrap().1;
        if common::http::sample(&m, "cinflow_jobs_total{outcome=\"done\"}") == 2.0 {
            assert_eq!(
                common::http::sample(&m, "cinflow_job_duration_seconds_count"),
                2.0
            );
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{m}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(second["features_computed"], 0);

    // The first job delivered again (as after a crash between its outcome and
    // its ack): announced again from the stored outcome, not trained again.
    let versions = registry.versions().unwrap().len();
    let again = serde_json::json!({
        "schema": "cinflow.train/v1", "job_id": job, "labels": labels, "model": fx.model,
    });
    fx.rt
        .block_on(cinflow::queue::publish_json(
            &fx.channel,
            &fx.amqp,
            &fx.amqp.jobs_exchange,
            cinflow::queue::TRAIN_KEY,
            &job,
            &serde_json::to_vec(&again).unwrap(),
            None,
        ))
        .unwrap();
    let t = Instant::now();
    let repeat = loop {
        let events = fx.events();
        if let Some((_, e)) = events
            .into_iter()
            .find(|(k, e)| k == "train.ok" && e["job_id"] == job.as_str())
        {
            break e;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no repeated event:\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        repeat["created_at"], first["created_at"],
        "the stored outcome, unchanged"
    );
    assert_eq!(
        registry.versions().unwrap().len(),
        versions,
        "trained again"
    );
    assert!(w.log().contains("already trained"), "{}", w.log());

    // A labels file that is not there: an error outcome and a dead letter.
    let job3 = enqueue_train(
        &fx,
        &format!("s3://{}/{}/data/nope.csv", fx.s3.bucket, fx.prefix),
    );
    let third = wait_outcome(&fx, &job3, &w);
    assert_eq!(third["status"], "error");
    assert!(
        third["error"].as_str().unwrap().contains("no such object"),
        "{third:#}"
    );
    let dead = fx
        .get(&fx.amqp.train_dlq(), Duration::from_secs(10))
        .expect("dead-lettered");
    assert_eq!(
        dead.delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        job3
    );
}

#[test]
fn a_training_worker_killed_mid_run_promotes_nothing_and_the_job_is_redelivered() {
    let fx = Fixture::new("trainkill", 4);
    let labels = dataset(&fx);
    let env = [
        ("CINFLOW_TRAIN_DEVICE", "cpu"),
        ("CINFLOW_TRAIN_TEST_FRACTION", "0.25"),
    ];
    let mut a = fx.spawn("train", &env);
    let job = enqueue_train(&fx, &labels);
    fx.wait_taken(&fx.amqp.train_queue);
    std::thread::sleep(Duration::from_millis(1500));
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(10)).expect("killed");
    let key = format!("{}/train-results/{job}.json", fx.prefix);
    let finished_before = fx.store.exists(&key).unwrap();
    eprintln!("training finished before the kill: {finished_before}");
    let registry = fx.registry();
    if !finished_before {
        assert_eq!(registry.versions().unwrap(), vec!["v1".to_string()]);
        assert_eq!(registry.alias("current").unwrap().unwrap().version, "v1");
    }

    let b = fx.spawn("train", &env);
    let outcome = wait_outcome(&fx, &job, &b);
    assert_eq!(outcome["status"], "ok", "{outcome:#}\n{}", b.log());
    if !finished_before {
        assert_eq!(outcome["attempt"], 2);
    }
    assert_eq!(registry.versions().unwrap().len(), 2);
    assert_eq!(fx.ready(&fx.amqp.train_queue), 0);
}
