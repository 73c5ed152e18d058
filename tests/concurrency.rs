//! Two copies of one job at once, against the real RabbitMQ and Garage: the
//! job lease and the claim keep a job to one result set and one set of event
//! bytes, on workers serving different model versions, and the LIS bridge
//! (several deliveries at once) sends each result to the LIS once.
//!
//! Also here: a job that kills its worker every time is dead-lettered on its
//! own while the jobs beside it complete (the quarantine lane).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::faulty_s3::FaultyS3;
use common::lis::{delete_bridge_queues, start_bridge, wait_for, Peer};
use common::worker::{bundle_as_version, Fixture, Worker};

/// Publishes `body` twice at the same instant, on two channels of their own
/// connections, the way two publishers (or a publisher retrying after a lost
/// confirm) would.
fn publish_twice(fx: &Fixture, chans: &[lapin::Channel; 2], id: &str, body: &[u8]) {
    fx.rt.block_on(async {
        let copies = chans.iter().map(|ch| {
            cinflow::queue::publish_json(
                ch,
                &fx.amqp,
                &fx.amqp.jobs_exchange,
                cinflow::queue::INFER_KEY,
                id,
                body,
                None,
            )
        });
        for sent in futures_util::future::join_all(copies).await {
            sent.unwrap();
        }
    });
}

/// Every result event so far, raw: (job id, routing key, bytes).
fn raw_events(fx: &Fixture) -> Vec<(String, String, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(m) = fx.get(&format!("{}.events", fx.prefix), Duration::ZERO) {
        let v: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
        out.push((
            v["job_id"].as_str().unwrap_or_default().to_string(),
            m.delivery.routing_key.to_string(),
            m.delivery.data.clone(),
        ));
    }
    out
}

#[test]
fn two_copies_of_every_job_on_workers_of_two_versions_grade_once_and_reach_the_lis_once() {
    let fx = Fixture::new("copies", 4);
    let token = fx.tmp.path().join("fhir-token");
    std::fs::write(&token, "token\n").unwrap();
    let peer = Peer::start(fx.tmp.path(), &token);
    let pool = fx.images(4, 640, 480);
    let settings = [
        ("CINFLOW_CONCURRENCY", "2"),
        ("CINFLOW_RETRY_DELAY_S", "1"),
        // Each worker keeps the version it started with for the whole run.
        ("CINFLOW_MODEL_POLL_S", "3600"),
    ];
    let old = fx.spawn("infer", &settings);
    wait_for("the v1 worker", Duration::from_secs(60), || {
        old.log().contains("consuming").then_some(())
    });
    // A promotion reaches the second worker only: for the run, one worker
    // serves v1 and the other v2, under a registry name that differs from
    // the bundles' own.
    let v2 = bundle_as_version(&fx.bundle, &fx.tmp.path().join("v2"), "bundle-4class", "v2");
    let registry = fx.registry();
    registry.publish(&v2).unwrap();
    registry
        .set_alias("current", "v2", "test: promoted")
        .unwrap();
    let new = fx.spawn("infer", &settings);
    wait_for("the v2 worker", Duration::from_secs(60), || {
        new.log().contains("consuming").then_some(())
    });
    let lis_queue = format!("{}.lis", fx.prefix);
    let metrics = common::http::free_port();
    // The bridge delivers four results at once.
    // The LIS is slow to acknowledge: a result's second event arrives while
    // its first is still being delivered, the window the lease closes.
    peer.control("hl7_delay_s=0.2");
    let bridge = start_bridge(
        &fx,
        &peer,
        &lis_queue,
        &token,
        metrics,
        &[("CINFLOW_CONCURRENCY", "4")],
    );

    // Two publishers on connections of their own.
    let (_conns, chans) = fx.rt.block_on(async {
        let c1 = cinflow::queue::connect(&fx.amqp, "test-publisher-1")
            .await
            .unwrap();
        let c2 = cinflow::queue::connect(&fx.amqp, "test-publisher-2")
            .await
            .unwrap();
        let ch1 = cinflow::queue::confirm_channel(&c1).await.unwrap();
        let ch2 = cinflow::queue::confirm_channel(&c2).await.unwrap();
        ((c1, c2), [ch1, ch2])
    });
    let rounds = 50;
    let jobs: Vec<String> = (0..rounds).map(|i| format!("twice-{i:02}")).collect();
    for (i, id) in jobs.iter().enumerate() {
        let n = 1 + i % 3;
        let slide: Vec<String> = (0..n).map(|k| pool[(i + k) % pool.len()].clone()).collect();
        let mut job = fx.job(id, &slide);
        job.patient_id = Some(format!("PAT-{i}"));
        publish_twice(&fx, &chans, id, &serde_json::to_vec(&job).unwrap());
    }

    // Every job ends with exactly one result set, under v1 or v2.
    let mut versions = BTreeMap::new();
    for id in &jobs {
        let found = wait_for(
            &format!("the result of {id}"),
            Duration::from_secs(240),
            || {
                let v1 = fx.result(id, "v1");
                let v2 = fx.result(id, "v2");
                match (v1, v2) {
                    (Some(_), Some(_)) => panic!("{id} has a result set under v1 and under v2"),
                    (Some(r), None) | (None, Some(r)) => Some(r),
                    (None, None) => None,
                }
            },
        );
        assert_eq!(
            found.status,
            cinflow::result::ImageStatus::Ok,
            "{id}: {:?}",
            found.error
        );
        versions.insert(id.clone(), found.model.version.clone());
    }
    // Both copies settled: nothing waits any more.
    wait_for("both copies of every job", Duration::from_secs(120), || {
        (fx.ready(&fx.amqp.infer_queue) == 0
            && fx.ready(&cinflow::queue::AmqpConfig::delay_queue(
                &fx.amqp.infer_queue,
            )) == 0)
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    for id in &jobs {
        let objects = fx.result_objects(id);
        let sets: BTreeSet<&str> = objects
            .iter()
            .filter(|k| k.ends_with("/result.json"))
            .map(|k| k.as_str())
            .collect();
        assert_eq!(sets.len(), 1, "{id}: {objects:#?}");
        let claim: serde_json::Value = serde_json::from_slice(
            &cinflow::storage::ObjectStore::get(
                &*fx.store,
                &format!("{}/results/{id}/claim.json", fx.prefix),
            )
            .unwrap(),
        )
        .unwrap();
        // The claim names the model as the registry does.
        assert_eq!(claim["model"], fx.model.as_str(), "{claim}");
        assert_eq!(claim["version"], versions[id].as_str(), "{claim}");
    }
    let by_version: BTreeSet<&String> = versions.values().collect();
    eprintln!("graded by: {by_version:?}");

    // Every event of a job carries the same bytes.
    let events = raw_events(&fx);
    let mut per_job: BTreeMap<String, BTreeSet<Vec<u8>>> = BTreeMap::new();
    for (job, key, bytes) in &events {
        assert_eq!(key, "result.ok", "{job}");
        per_job
            .entry(job.clone())
            .or_default()
            .insert(bytes.clone());
    }
    for id in &jobs {
        let distinct = per_job.get(id).map_or(0, BTreeSet::len);
        assert_eq!(distinct, 1, "{id}: {distinct} different result events");
    }
    let announced = events.len();
    eprintln!("{announced} result events for {rounds} jobs published twice");

    // The LIS received each result once, whatever number of events.
    for (i, id) in jobs.iter().enumerate() {
        let got = wait_for(
            &format!("the ORU of {id}"),
            Duration::from_secs(120),
            || {
                let m = peer.hl7_of(&format!("ACC-{id}"));
                (!m.is_empty()).then_some(m)
            },
        );
        assert!(got[0]["text"]
            .as_str()
            .unwrap()
            .contains(&format!("PAT-{i}")));
    }
    wait_for("the bridge to settle", Duration::from_secs(120), || {
        (fx.ready(&lis_queue) == 0
            && fx.ready(&cinflow::queue::AmqpConfig::delay_queue(&lis_queue)) == 0)
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    for id in &jobs {
        let n = peer.hl7_of(&format!("ACC-{id}")).len();
        assert_eq!(n, 1, "{id} reached the LIS {n} times\n{}", bridge.log());
    }
    assert_eq!(fx.ready(&fx.amqp.infer_dlq()), 0);
    drop(bridge);
    delete_bridge_queues(&fx, &lis_queue);
    drop((old, new));
}

#[test]
fn a_job_that_kills_its_worker_is_dead_lettered_alone_and_the_others_complete() {
    let fx = Fixture::with_delivery_limit("crasher", 4, 5);
    let proxy = FaultyS3::start(&common::s3_config().endpoint.unwrap());
    let ordinary = fx.images(2, 640, 480);
    let killer = common::synth_images(&fx.tmp.path().join("killer"), 1, 640, 480);
    let crasher_image = fx.put(
        "killer-slides/slide.jpg",
        &std::fs::read(&killer[0]).unwrap(),
    );
    // The crasher's image arrives slowly: the harness kills the worker while
    // it is being graded, as an out-of-memory kill would.
    proxy.delay("GET", "/killer-slides/", 1000, Duration::from_secs(2));
    fx.publish(&fx.job("crasher", std::slice::from_ref(&crasher_image)));
    let jobs: Vec<String> = (0..10).map(|i| format!("bystander-{i}")).collect();
    for id in &jobs {
        fx.publish(&fx.job(id, &ordinary));
    }
    let endpoint = proxy.endpoint();
    let spawn = || -> Worker {
        fx.spawn(
            "infer",
            &[
                ("CINFLOW_S3_ENDPOINT", endpoint.as_str()),
                ("CINFLOW_CONCURRENCY", "3"),
            ],
        )
    };
    let dlq = fx.amqp.infer_dlq();
    let mut kills = 0;
    let mut seen = 0;
    let t = Instant::now();
    let mut w = spawn();
    while fx.ready(&dlq) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(400),
            "not dead-lettered after {kills} kills:\n{}",
            w.log()
        );
        let fetched = proxy.count("GET", "/killer-slides/");
        if fetched > seen {
            seen = fetched;
            w.signal("KILL");
            w.wait_exit(Duration::from_secs(10)).expect("killed");
            kills += 1;
            w = spawn();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let dl = fx.dead_letters(1);
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].0, "crasher", "{dl:?}");
    assert!(
        dl[0]
            .1
            .starts_with("the worker died while grading this job 5 times"),
        "{}",
        dl[0].1
    );
    // Once in the main lane, then five times alone in the quarantine lane.
    assert_eq!(kills, 6, "{}", w.log());
    let r = fx
        .result("crasher", "v1")
        .expect("the crasher's error result");
    assert_eq!(r.status, cinflow::result::ImageStatus::Error);
    for id in &jobs {
        fx.wait_graded(id, 2, &w);
    }
    assert!(fx.get(&dlq, Duration::from_secs(1)).is_none());
}
