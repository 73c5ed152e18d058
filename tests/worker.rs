//! `cinflow worker infer` as a process against the real RabbitMQ and Garage:
//! happy paths for 4- and 2-class models and multi-image slides, every kind of
//! bad input dead-lettered with its reason and an error result while the worker
//! keeps consuming, a poison message, SIGKILL mid-job, a dropped broker
//! connection, a promoted model picked up without a restart (and a corrupt one
//! refused), and a graceful SIGTERM.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cinflow::result::ImageStatus;
use common::worker::{bundle_as_version, close_broker_connection, result_set_objects, Fixture};

/// Independent check of a result: its probabilities against local-mode
/// classification of the same bytes with the same bundle.
fn check_against_local(fx: &Fixture, r: &cinflow::result::ResultRecord) {
    let local = fx.grade_locally(r, 4);
    for (img, want) in r.images.iter().zip(&local) {
        let (got, probs) = (
            img.probabilities.as_ref().unwrap(),
            want.probabilities.as_ref().unwrap(),
        );
        for (c, p) in probs {
            assert!(
                (got[c] - p).abs() < 1e-5,
                "{c}: worker {} vs local {p}",
                got[c]
            );
        }
        assert_eq!(img.sha256, want.sha256);
    }
}

fn happy_path(classes: u32) {
    let fx = Fixture::new(&format!("happy{classes}"), classes);
    // Backbone calls of at most 2 images: the 3-image slide needs two.
    let w = fx.spawn("infer", &[("CINFLOW_MAX_BATCH", "2")]);
    let slide = fx.images(3, 640, 480);
    fx.publish(&fx.job("slide-a", &slide));
    fx.publish(&fx.job("single", &slide[1..2]));
    for (job, n) in [("slide-a", 3), ("single", 1)] {
        let r = fx.wait_result(job, "v1", &w);
        assert_eq!(r.status, ImageStatus::Ok, "{r:?}");
        assert_eq!(r.images.len(), n);
        assert_eq!(
            r.ids.accession_id.as_deref(),
            Some(format!("ACC-{job}").as_str())
        );
        assert_eq!(r.model.classes.len(), classes as usize);
        for img in &r.images {
            let p = img.probabilities.as_ref().unwrap();
            let sum: f32 = p.values().sum();
            assert!((sum - 1.0).abs() < 1e-5, "{sum}");
            assert!(img.batch.unwrap().images <= 2);
            // The predicted class's overlay and the preprocessed image, as JPEGs.
            assert_eq!(img.heatmaps.len(), 1);
            assert_eq!(Some(&img.heatmaps[0].class), img.predicted_class.as_ref());
            let stored = |uri: &str| {
                let key = uri.split_once(&format!("{}/", fx.s3.bucket)).unwrap().1;
                cinflow::storage::ObjectStore::get(&*fx.store, key).unwrap()
            };
            for uri in [
                &img.heatmaps[0].overlay,
                img.preprocessed_image.as_ref().unwrap(),
            ] {
                let jpg = stored(uri);
                assert_eq!(&jpg[..3], &[0xFF, 0xD8, 0xFF], "{uri}");
                let decoded = image::load_from_memory(&jpg).unwrap();
                assert_eq!((decoded.width(), decoded.height()), (800, 600));
            }
            let raw = stored(&img.raw_map.as_ref().unwrap().uri);
            assert_eq!(&raw[..6], b"\x93NUMPY");
        }
        // The slide grade is the grade of the image with the highest P(CIN2+)
        // (P(CIN) for 2 classes: the first class), which the record names.
        let score = |i: &cinflow::result::ImageResult| match i.p_cin2_plus {
            Some(p) => p,
            None => i.probabilities.as_ref().unwrap()[&r.model.classes[0]],
        };
        let deciding = r
            .images
            .iter()
            .fold(&r.images[0], |b, i| if score(i) > score(b) { i } else { b });
        let g = r.slide_grade.as_ref().unwrap();
        assert_eq!(g.grade, *deciding.predicted_class.as_ref().unwrap());
        assert_eq!(g.image_uri, deciding.uri);
        assert_eq!(g.triage.is_some(), classes > 2, "{g:?}");
        check_against_local(&fx, &r);
        // The viewer page beside the record links every image's stored
        // preprocessed JPEG (relative to itself) and embeds its raw maps and
        // the record.
        let viewer = r.viewer_uri.as_ref().expect("a viewer page");
        let key = viewer.split_once(&format!("{}/", fx.s3.bucket)).unwrap().1;
        let folder = key.strip_suffix("viewer.html").expect(key);
        let page = String::from_utf8(
            cinflow::storage::ObjectStore::get(&*fx.store, key)
                .unwrap()
                .to_vec(),
        )
        .unwrap();
        let data = page.split("id=\"cinflow-data\">").nth(1).unwrap();
        let data: serde_json::Value =
            serde_json::from_str(data.split("</script>").next().unwrap()).unwrap();
        assert_eq!(data["record"]["job_id"], job);
        assert_eq!(data["images"].as_array().unwrap().len(), n);
        for (img, emb) in r.images.iter().zip(data["images"].as_array().unwrap()) {
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD;
            let uri = img.preprocessed_image.as_ref().unwrap();
            let jpeg_key = uri.split_once(&format!("{}/", fx.s3.bucket)).unwrap().1;
            assert_eq!(
                format!("{folder}{}", emb["src"].as_str().unwrap()),
                jpeg_key
            );
            let raw = img.raw_map.as_ref().unwrap();
            assert_eq!(emb["shape"], serde_json::json!(raw.shape));
            let raw_key = raw.uri.split_once(&format!("{}/", fx.s3.bucket)).unwrap().1;
            let npy = cinflow::storage::ObjectStore::get(&*fx.store, raw_key).unwrap();
            let maps = b64.decode(emb["maps_base64"].as_str().unwrap()).unwrap();
            assert_eq!(maps.len(), raw.shape.iter().product::<usize>() * 4);
            assert!(npy.ends_with(&maps), "the page's maps are not cam.npy's");
        }
        assert_eq!(fx.result_objects(job).len(), result_set_objects(n));
    }
    // The schema file's example, as a minimal publisher sends it: no message_id,
    // no timestamp, no content type.
    let schema: serde_json::Value =
        serde_json::from_str(include_str!("../src/queue/schemas/job.v1.schema.json")).unwrap();
    let mut example = schema["examples"][0].clone();
    example["job_id"] = "schema-example".into();
    example["images"] = serde_json::json!(&slide[..2]);
    fx.rt.block_on(async {
        fx.channel
            .basic_publish(
                fx.amqp.jobs_exchange.as_str().into(),
                "infer".into(),
                Default::default(),
                &serde_json::to_vec(&example).unwrap(),
                Default::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    });
    let r = fx.wait_result("schema-example", "v1", &w);
    assert_eq!((r.status, r.images.len()), (ImageStatus::Ok, 2));
    assert_eq!(r.ids.accession_id.as_deref(), Some("A-778812"));
    assert_eq!(r.slide_id.as_deref(), Some("S-2026-00123"));

    let events = fx.events();
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(events
        .iter()
        .all(|(k, e)| k == "result.ok" && e["schema"] == "cinflow.result/v2"));
}

#[test]
fn grades_slides_with_a_four_class_model() {
    happy_path(4);
}

#[test]
fn grades_slides_with_a_two_class_model() {
    happy_path(2);
}

/// A PNG announcing `w x h` pixels in its header, with one tiny compressed
/// data chunk: a decompression bomb's shape.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for b in bytes {
            c ^= *b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |body: &[u8]| {
        png.extend_from_slice(&(body.len() as u32 - 4).to_be_bytes());
        png.extend_from_slice(body);
        png.extend_from_slice(&crc32(body).to_be_bytes());
    };
    chunk(&ihdr);
    // zlib stream of a few zero bytes (stored block).
    chunk(b"IDAT\x78\x01\x01\x04\x00\xfb\xff\x00\x00\x00\x00\x00\x04\x00\x01");
    chunk(b"IEND");
    png
}

#[test]
fn bad_jobs_are_dead_lettered_with_reasons_and_error_results() {
    let fx = Fixture::new("bad", 4);
    let good = fx.images(1, 640, 480);
    let jpeg = cinflow::storage::ObjectStore::get(
        &*fx.store,
        good[0].split_once(&format!("{}/", fx.s3.bucket)).unwrap().1,
    )
    .unwrap();

    // A poison message: every worker that took it failed (ran past its
    // deadline or panicked) up to the delivery limit, as the copies the
    // workers make of a failed delivery count it.
    let mut failed = lapin::types::FieldTable::default();
    failed.insert(
        "x-cinflow-failures".into(),
        lapin::types::AMQPValue::LongLongInt(i64::from(fx.amqp.delivery_limit)),
    );
    fx.rt
        .block_on(cinflow::queue::publish_json(
            &fx.channel,
            &fx.amqp,
            &fx.amqp.jobs_exchange,
            cinflow::queue::INFER_KEY,
            "poison",
            &serde_json::to_vec(&fx.job("poison", &good)).unwrap(),
            Some(failed),
        ))
        .unwrap();

    fx.publish_raw("bad-json", b"{\"schema\": \"cinflow.job/v1\", \"job_id\": ");
    fx.publish_raw(
        "wrong-schema",
        br#"{"schema": "cinflow.job/v9", "job_id": "wrong-schema", "slide_id": "s", "images": ["s3://b/k.jpg"]}"#,
    );
    let missing = format!("s3://{}/{}/no/such/image.jpg", fx.s3.bucket, fx.prefix);
    fx.publish(&fx.job("missing", &[missing]));
    fx.publish(&fx.job(
        "not-image",
        &[fx.put("bad/notes.jpg", b"this is a text file, not an image")],
    ));
    fx.publish(&fx.job(
        "truncated",
        &[fx.put("bad/cut.jpg", &jpeg[..jpeg.len() / 2])],
    ));
    fx.publish(&fx.job(
        "huge",
        &[fx.put("bad/huge.png", &png_header(100_000, 100_000))],
    ));
    // One good and one bad image: the good one is graded, the job is still an error.
    fx.publish(&fx.job(
        "mixed",
        &[good[0].clone(), fx.put("bad/cut2.jpg", &jpeg[..100])],
    ));

    let w = fx.spawn("infer", &[]);
    let expected = [
        ("poison", "poison message: 3 failed deliveries"),
        ("bad-json", "not valid JSON"),
        ("wrong-schema", "expected \"cinflow.job/v1\""),
        ("missing", "no such object"),
        ("not-image", "unsupported image format"),
        ("truncated", "truncated"),
        ("huge", "100000x100000 exceeds limit"),
        ("mixed", "1 of 2 images not graded"),
    ];
    let dead = fx.dead_letters(expected.len());
    assert_eq!(dead.len(), expected.len(), "{dead:?}\n{}", w.log());
    for (id, want) in expected {
        let (_, reason, _) = dead
            .iter()
            .find(|(m, _, _)| m == id)
            .unwrap_or_else(|| panic!("{id} not dead-lettered: {dead:?}"));
        assert!(reason.contains(want), "{id}: {reason:?} lacks {want:?}");
        let r = fx.wait_result(id, "v1", &w);
        assert_eq!(r.status, ImageStatus::Error);
        assert!(
            r.error.as_deref().unwrap().contains(want),
            "{id}: {:?}",
            r.error
        );
    }
    let mixed = fx.result("mixed", "v1").unwrap();
    assert_eq!(mixed.images[0].status, ImageStatus::Ok);
    assert_eq!(mixed.images[1].status, ImageStatus::Error);

    // Still consuming.
    fx.publish(&fx.job("after", &good));
    assert_eq!(fx.wait_result("after", "v1", &w).status, ImageStatus::Ok);
    assert_eq!(fx.ready(&fx.amqp.infer_queue), 0);
}

#[test]
fn a_killed_worker_job_is_redelivered_and_written_once() {
    let fx = Fixture::new("kill", 4);
    let slide = fx.images(6, 2560, 1920);
    let mut a = fx.spawn("infer", &[("CINFLOW_CONCURRENCY", "1")]);
    // Wait until worker A holds the job (no longer ready), then kill it mid-job.
    fx.publish(&fx.job("killed", &slide));
    fx.wait_taken(&fx.amqp.infer_queue);
    std::thread::sleep(Duration::from_millis(300));
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(10)).expect("killed");
    let before = fx.result("killed", "v1");
    eprintln!("result before the restart: {}", before.is_some());

    // B with one-second heartbeats: they must keep flowing while it grades.
    let b = fx.spawn("infer", &[("CINFLOW_AMQP_HEARTBEAT_S", "1")]);
    let r = fx.wait_result("killed", "v1", &b);
    let r = if before.is_some() {
        // A finished before the kill landed; B must not make a second result set.
        std::thread::sleep(Duration::from_secs(2));
        fx.result("killed", "v1").unwrap()
    } else {
        r
    };
    assert_eq!(r.status, ImageStatus::Ok);
    if before.is_none() {
        assert_eq!(r.attempt, Some(2), "the second delivery finished the job");
    }
    // Exactly one result set: the deterministic keys, nothing else.
    let objects = fx.result_objects("killed");
    assert_eq!(objects.len(), result_set_objects(6), "{objects:#?}");
    assert!(objects
        .iter()
        .all(|k| k.contains("/killed/") && (k.contains("/v1/") || k.ends_with("/claim.json"))));
    assert_eq!(fx.ready(&fx.amqp.infer_queue), 0);
    assert!(!b.log().contains("connection lost"), "{}", b.log());
}

#[test]
fn a_dropped_broker_connection_is_reestablished() {
    let fx = Fixture::new("drop", 4);
    // Nobody listens to result events here: jobs must still finish.
    fx.rt.block_on(async {
        fx.channel
            .queue_delete(
                format!("{}.events", fx.prefix).as_str().into(),
                Default::default(),
            )
            .await
            .unwrap();
    });
    let img = fx.images(1, 640, 480);
    let w = fx.spawn("infer", &[]);
    fx.publish(&fx.job("first", &img));
    fx.wait_result("first", "v1", &w);
    close_broker_connection(w.pid());
    fx.publish(&fx.job("second", &img));
    let r = fx.wait_result("second", "v1", &w);
    assert_eq!(r.status, ImageStatus::Ok);
    assert!(w.log().contains("reconnecting"), "{}", w.log());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fx.ready(&fx.amqp.infer_queue), 0, "acked, not returned");
    assert!(!w.log().contains("returned to the queue"), "{}", w.log());
}

#[test]
fn a_promoted_model_is_picked_up_and_a_corrupt_one_refused() {
    let fx = Fixture::new("promote", 4);
    let img = fx.images(1, 640, 480);
    let w = fx.spawn("infer", &[]);
    fx.publish(&fx.job("one", &img));
    fx.wait_result("one", "v1", &w);

    // A version whose backbone does not match its manifest's sha256.
    let registry = fx.registry();
    for f in ["head.safetensors", "manifest.json", "backbone.onnx"] {
        let mut bytes = std::fs::read(fx.bundle.join(f)).unwrap();
        if f == "manifest.json" {
            let mut m: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            m["version"] = "v-bad".into();
            bytes = serde_json::to_vec(&m).unwrap();
        }
        if f == "backbone.onnx" {
            bytes.push(0);
        }
        let key = format!("models/{}/versions/v-bad/{f}", fx.model);
        cinflow::storage::ObjectStore::put(&*fx.store, &key, &bytes, "application/octet-stream")
            .unwrap();
    }
    registry
        .set_alias("current", "v-bad", "test: corrupt")
        .unwrap();
    let t = Instant::now();
    while !w.log().contains("keeping the current one") && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
    }
    fx.publish(&fx.job("two", &img));
    assert_eq!(fx.wait_result("two", "v1", &w).model.version, "v1");
    assert!(w.log().contains("sha256"), "{}", w.log());

    // A good new version: the next jobs use it, without a restart.
    let v2 = bundle_as_version(&fx.bundle, &fx.tmp.path().join("v2"), &fx.model, "v2");
    registry.publish(&v2).unwrap();
    registry.set_alias("current", "v2", "test: better").unwrap();
    let t = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let id = format!("three-{n}");
        fx.publish(&fx.job(&id, &img));
        std::thread::sleep(Duration::from_millis(500));
        if fx.result(&id, "v2").is_some() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "v2 never served:\n{}",
            w.log()
        );
    }
    // Only the served version stays in the model cache.
    let cached: Vec<String> = std::fs::read_dir(fx.tmp.path().join("model-cache").join(&fx.model))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(cached, vec!["v2".to_string()]);
    // A job can still ask for the old version by name.
    let mut job = fx.job("pinned", &img);
    job.model = Some("v1".into());
    fx.publish(&job);
    assert_eq!(fx.wait_result("pinned", "v1", &w).model.version, "v1");
}

#[test]
fn sigterm_finishes_the_job_in_flight_and_exits_zero() {
    let fx = Fixture::new("term", 4);
    let slide = fx.images(4, 2560, 1920);
    let mut w = fx.spawn("infer", &[("CINFLOW_CONCURRENCY", "1")]);
    fx.publish(&fx.job("draining", &slide));
    fx.wait_taken(&fx.amqp.infer_queue);
    w.signal("TERM");
    let status = w.wait_exit(Duration::from_secs(60)).expect("exits");
    assert!(status.success(), "{status:?}\n{}", w.log());
    let r = fx
        .result("draining", "v1")
        .expect("the in-flight job finished");
    assert_eq!(r.status, ImageStatus::Ok);
    assert_eq!(fx.ready(&fx.amqp.infer_queue), 0, "acked, not returned");

    // With no time to drain, the job in flight goes back to the queue (a copy,
    // no failure counted).
    // A slide of 12 images keeps it in flight well past the signal: the engine
    // grades 4 images of this size in about 0.3 s on 2 cores.
    let big = fx.images(12, 2560, 1920);
    let mut w = fx.spawn(
        "infer",
        &[
            ("CINFLOW_CONCURRENCY", "1"),
            ("CINFLOW_DRAIN_TIMEOUT_S", "0"),
        ],
    );
    fx.publish(&fx.job("returned", &big));
    fx.wait_taken(&fx.amqp.infer_queue);
    w.signal("TERM");
    let status = w.wait_exit(Duration::from_secs(30)).expect("exits");
    assert!(status.success(), "{status:?}\n{}", w.log());
    assert!(w.log().contains("go back to the queue"), "{}", w.log());
    assert_eq!(fx.ready(&fx.amqp.infer_queue), 1, "returned to the queue");
}

#[test]
fn a_dead_letter_is_sent_back_once_its_cause_is_fixed() {
    let fx = Fixture::new("replay", 4);
    let w = fx.spawn("infer", &[]);
    let late = format!("s3://{}/{}/late/a.jpg", fx.s3.bucket, fx.prefix);
    fx.publish(&fx.job("late-upload", std::slice::from_ref(&late)));
    let first = fx.wait_result("late-upload", "v1", &w);
    assert_eq!(first.status, ImageStatus::Error);

    let cli = |args: &[&str]| {
        let out = fx.command(&["dead-letters"]).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // The dead letter is listed with its reason (and stays queued).
    let t = Instant::now();
    let listed = loop {
        let (ok, out, err) = cli(&["list"]);
        assert!(ok, "{err}");
        if !out.is_empty() || t.elapsed() > Duration::from_secs(30) {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(listed.starts_with("late-upload\t"), "{listed}");
    assert!(listed.contains("no such object"), "{listed}");
    assert_eq!(
        cli(&["list"]).1,
        listed,
        "listing leaves the messages queued"
    );
    let (ok, _, err) = cli(&["requeue", "no-such-job"]);
    assert!(!ok && err.contains("no-such-job is not in"), "{err}");

    // The image arrives; the job goes back and its result becomes a graded one.
    let jpeg =
        std::fs::read(&common::synth_images(&fx.tmp.path().join("late"), 1, 640, 480)[0]).unwrap();
    fx.put("late/a.jpg", &jpeg);
    let (ok, out, err) = cli(&["requeue", "late-upload"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "late-upload");
    let t = Instant::now();
    loop {
        let r = fx.result("late-upload", "v1").unwrap();
        if r.status == ImageStatus::Ok {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "not re-graded:\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(cli(&["list"]).1, "", "the dead-letter queue is empty");
    assert_eq!(
        fx.result_objects("late-upload").len(),
        result_set_objects(1)
    );
}

#[test]
fn models_are_published_listed_and_rolled_back_in_the_s3_registry() {
    let fx = Fixture::new("publish", 4);
    let registry = fx.registry();
    let run = |args: &[&str]| {
        let (code, text) = common::output_all(
            fx.command(args)
                .env("CINFLOW_S3_BUCKET", &fx.s3.bucket)
                .env_remove("CINFLOW_REGISTRY"),
        );
        (code == Some(0), text)
    };
    let current = || registry.alias("current").unwrap().unwrap().version;

    // A new bundle into the bucket's registry: the alias follows.
    let v2 = bundle_as_version(&fx.bundle, &fx.tmp.path().join("v2"), &fx.model, "v2");
    let v2_arg = v2.to_str().unwrap();
    let (ok, text) = run(&["publish-model", v2_arg, "--model-name", &fx.model]);
    assert!(ok && text.contains("published"), "{text}");
    assert_eq!(current(), "v2");
    assert_eq!(registry.versions().unwrap(), ["v1", "v2"]);
    let (ok, text) = run(&["registry", "--model-name", &fx.model, "list"]);
    assert!(ok, "{text}");
    assert!(text.contains("v1: ") && text.contains("v2: "), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("v2: ") && l.ends_with("<- current")),
        "{text}"
    );

    // Rollback by hand, with the reason kept.
    let (ok, text) = run(&[
        "registry",
        "--model-name",
        &fx.model,
        "promote",
        "v1",
        "--reason",
        "rollback: test",
    ]);
    assert!(ok && text.contains("current -> v1 (was v2)"), "{text}");
    let alias = registry.alias("current").unwrap().unwrap();
    assert_eq!(
        (alias.version.as_str(), alias.reason.as_str()),
        ("v1", "rollback: test")
    );

    // Seeding again with the same bundle changes nothing, not even the alias.
    let (ok, text) = run(&["publish-model", v2_arg, "--model-name", &fx.model]);
    assert!(
        ok && text.contains("already published") && text.contains("left as it is"),
        "{text}"
    );
    assert_eq!(current(), "v1");

    // Another bundle under an existing version, and a tampered bundle, are refused.
    let other = bundle_as_version(
        &common::tiny_bundle(2),
        &fx.tmp.path().join("v2-other"),
        &fx.model,
        "v2",
    );
    let (ok, text) = run(&[
        "publish-model",
        other.to_str().unwrap(),
        "--model-name",
        &fx.model,
    ]);
    assert!(
        !ok && text.contains("already exists") && text.contains("different manifest"),
        "{text}"
    );
    let bad = bundle_as_version(&fx.bundle, &fx.tmp.path().join("v3"), &fx.model, "v3");
    let mut onnx = std::fs::read(bad.join("backbone.onnx")).unwrap();
    onnx.push(0);
    std::fs::write(bad.join("backbone.onnx"), onnx).unwrap();
    let (ok, text) = run(&[
        "publish-model",
        bad.to_str().unwrap(),
        "--model-name",
        &fx.model,
    ]);
    assert!(!ok && text.contains("sha256"), "{text}");
    assert_eq!(registry.versions().unwrap(), ["v1", "v2"]);
    assert_eq!(current(), "v1");
}

/// An Ed25519 key pair made by OpenSSL, as docs/model.md shows: (private, public).
fn openssl_key_pair(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (private, public) = (dir.join("signing.pem"), dir.join("signing.pub.pem"));
    for args in [
        vec![
            "genpkey",
            "-algorithm",
            "ed25519",
            "-out",
            private.to_str().unwrap(),
        ],
        vec![
            "pkey",
            "-in",
            private.to_str().unwrap(),
            "-pubout",
            "-out",
            public.to_str().unwrap(),
        ],
    ] {
        let ok = std::process::Command::new("openssl")
            .args(&args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "openssl {args:?}");
    }
    (private, public)
}

#[test]
fn signed_models_cannot_be_swapped_by_whoever_writes_to_the_bucket() {
    let fx = Fixture::new("signed", 4);
    let img = fx.images(1, 640, 480);
    let (private, public) = openssl_key_pair(fx.tmp.path());
    let signing = Arc::new(cinflow::model::signing::SigningKey::from_pem_file(&private).unwrap());
    let registry = fx.registry().signing_with(signing);
    // A signed version, promoted with the CLI as a lab would.
    let s1 = bundle_as_version(&fx.bundle, &fx.tmp.path().join("s1"), "bundle-4class", "s1");
    let out = fx
        .command(&[
            "publish-model",
            s1.to_str().unwrap(),
            "--model-name",
            &fx.model,
        ])
        .env("CINFLOW_S3_BUCKET", &fx.s3.bucket)
        .env("CINFLOW_SIGNING_KEY_FILE", &private)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("signing with key"));
    // OpenSSL, an independent implementation, verifies the signature over
    // the manifest's bytes.
    let sig: serde_json::Value = serde_json::from_slice(
        &cinflow::storage::ObjectStore::get(
            &*fx.store,
            &format!("models/{}/versions/s1/manifest.sig.json", fx.model),
        )
        .unwrap(),
    )
    .unwrap();
    let raw = base64_decode(sig["signature"].as_str().unwrap());
    let dir = fx.tmp.path();
    std::fs::write(dir.join("sig.bin"), raw).unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        cinflow::storage::ObjectStore::get(
            &*fx.store,
            &format!("models/{}/versions/s1/manifest.json", fx.model),
        )
        .unwrap(),
    )
    .unwrap();
    let verified = std::process::Command::new("openssl")
        .args(["pkeyutl", "-verify", "-pubin", "-inkey"])
        .arg(&public)
        .arg("-rawin")
        .arg("-in")
        .arg(dir.join("manifest.json"))
        .arg("-sigfile")
        .arg(dir.join("sig.bin"))
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );

    fx.registry()
        .set_alias("current", "s1", "test: signed")
        .unwrap();
    let public_env = public.to_str().unwrap();
    let port = common::http::free_port();
    let addr = format!("127.0.0.1:{port}");
    let w = fx.spawn(
        "infer",
        &[
            ("CINFLOW_TRUSTED_KEYS", public_env),
            ("CINFLOW_METRICS_ADDR", addr.as_str()),
        ],
    );
    fx.publish(&fx.job("first", &img));
    assert_eq!(fx.wait_result("first", "s1", &w).model.version, "s1");
    let refusals = |reason: &str| {
        common::http::get(port, "/metrics").map_or(0.0, |(_, m)| {
            common::http::sample(
                &m,
                &format!("cinflow_model_refusals_total{{reason=\"{reason}\"}}"),
            )
        })
    };

    // Someone with write access swaps a signed version's backbone: one byte
    // flipped, and the manifest's sha256 for it rewritten to match.
    let s2 = bundle_as_version(&fx.bundle, &fx.tmp.path().join("s2"), "bundle-4class", "s2");
    registry.publish(&s2).unwrap();
    let key = |f: &str| format!("models/{}/versions/s2/{f}", fx.model);
    let mut backbone =
        cinflow::storage::ObjectStore::get(&*fx.store, &key("backbone.onnx")).unwrap();
    let last = backbone.len() - 1;
    backbone[last] ^= 0x01;
    cinflow::storage::ObjectStore::put(
        &*fx.store,
        &key("backbone.onnx"),
        &backbone,
        "application/octet-stream",
    )
    .unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(
        &cinflow::storage::ObjectStore::get(&*fx.store, &key("manifest.json")).unwrap(),
    )
    .unwrap();
    m["files"]["backbone.onnx"] = cinflow::hashing::sha256_hex(&backbone).into();
    cinflow::storage::ObjectStore::put(
        &*fx.store,
        &key("manifest.json"),
        &serde_json::to_vec_pretty(&m).unwrap(),
        "application/json",
    )
    .unwrap();
    fx.registry()
        .set_alias("current", "s2", "test: swapped")
        .unwrap();
    let t = Instant::now();
    while refusals("mismatch") < 1.0 && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(refusals("mismatch"), 1.0, "{}", w.log());
    fx.publish(&fx.job("after-swap", &img));
    assert_eq!(fx.wait_result("after-swap", "s1", &w).model.version, "s1");

    // The alias moved to a version nobody signed.
    let u3 = bundle_as_version(&fx.bundle, &fx.tmp.path().join("u3"), "bundle-4class", "u3");
    fx.registry().publish(&u3).unwrap();
    fx.registry()
        .set_alias("current", "u3", "test: unsigned")
        .unwrap();
    let t = Instant::now();
    while refusals("unsigned") < 1.0 && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(refusals("unsigned"), 1.0, "{}", w.log());
    fx.publish(&fx.job("after-unsigned", &img));
    assert_eq!(
        fx.wait_result("after-unsigned", "s1", &w).model.version,
        "s1"
    );
    let log = w.log();
    assert!(log.contains("is not signed"), "{log}");
    assert!(log.contains("does not match the manifest"), "{log}");

    // A worker without keys serves it, and says at start that it checks nothing.
    let open = fx.spawn("infer", &[]);
    let t = Instant::now();
    while !open.log().contains("consuming") && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        open.log().contains("model versions are not verified"),
        "{}",
        open.log()
    );
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}
