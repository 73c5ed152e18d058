//! What the LIS reads, from real worker runs against the real RabbitMQ and
//! Garage: jobs published by `cinflow enqueue` / `enqueue-train`, the result
//! records and their events validate against the repo's JSON Schemas, and the
//! FHIR R4 DiagnosticReports beside the results validate with an independent
//! FHIR library (fhir.resources, in tools/validate_outputs.py). The
//! validators themselves are shown to reject broken documents.

mod common;

use std::time::Duration;

use cinflow::model::Triage;
use cinflow::result::{ImageStatus, ResultRecord};
use cinflow::storage::ObjectStore;
use common::worker::Fixture;
use common::{assert_valid, validate_outputs};
use serde_json::Value;

/// Takes every message waiting in `queue` (they are gone from it afterwards).
fn drain(fx: &Fixture, queue: &str) -> Vec<Value> {
    let mut out = Vec::new();
    while let Some(m) = fx.get(
        queue,
        Duration::from_secs(if out.is_empty() { 10 } else { 0 }),
    ) {
        out.push(serde_json::from_slice(&m.delivery.data).unwrap());
    }
    out
}

fn get_json(fx: &Fixture, uri: &str) -> Value {
    let key = uri
        .strip_prefix(&format!("s3://{}/", fx.s3.bucket))
        .unwrap_or_else(|| panic!("{uri} is not in the test bucket"));
    serde_json::from_slice(&fx.store.get(key).unwrap()).unwrap()
}

fn contained<'a>(report: &'a Value, kind: &str) -> Vec<&'a Value> {
    report["contained"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["resourceType"] == kind)
        .collect()
}

#[test]
fn results_reports_and_messages_validate_against_the_schemas_and_fhir_r4() {
    let fx = Fixture::new("lis", 4);
    let slide = fx.images(2, 900, 700);
    let broken = fx.put("slides/broken/1.jpg", b"this is not an image");

    // Jobs as `cinflow enqueue` publishes them (with the LIS ids), taken off
    // the queue to be checked and then handed to the worker unchanged.
    let enqueue = |args: &[&str]| {
        common::output_ok(
            fx.command(&[&["enqueue"], args].concat())
                .env("CINFLOW_S3_BUCKET", &fx.s3.bucket),
        )
    };
    let printed = enqueue(&[
        &slide[0],
        &slide[1],
        "--accession-id",
        "ACC-77",
        "--patient-id",
        "PAT-001",
        "--specimen-id",
        "SP-9",
    ]);
    enqueue(&[&slide[0], &broken, "--group", "image"]);
    let jobs = drain(&fx, &fx.amqp.infer_queue);
    assert_eq!(jobs.len(), 3, "{jobs:?}");
    assert_valid(Some("job.v1.schema.json"), &jobs);
    let ok_job = printed.split('\t').next().unwrap().to_string();

    // A training job as the nightly CronJob publishes it.
    common::output_ok(&mut fx.command(&[
        "enqueue-train",
        "--labels",
        &format!("s3://{}/{}/labels.csv", fx.s3.bucket, fx.prefix),
        "--model-name",
        &fx.model,
        "--set",
        "max_epochs=3",
    ]));
    let train_jobs = drain(&fx, &fx.amqp.train_queue);
    assert_eq!(train_jobs.len(), 1);
    assert_valid(Some("train.v1.schema.json"), &train_jobs);

    for j in &jobs {
        fx.publish_raw(
            j["job_id"].as_str().unwrap(),
            &serde_json::to_vec(j).unwrap(),
        );
    }
    fx.publish_raw(
        "lis-malformed",
        b"{\"schema\": \"cinflow.job/v1\", \"job_id\": 7}",
    );
    let w = fx.spawn("infer", &[]);

    let mut records: Vec<ResultRecord> = jobs
        .iter()
        .map(|j| fx.wait_result(j["job_id"].as_str().unwrap(), "v1", &w))
        .collect();
    records.push(fx.wait_result("lis-malformed", "v1", &w));
    let statuses: Vec<ImageStatus> = records.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == ImageStatus::Ok).count(),
        2,
        "{statuses:?}"
    );

    // Records as stored, and as announced.
    let stored: Vec<Value> = records
        .iter()
        .map(|r| get_json(&fx, r.result_uri.as_deref().unwrap()))
        .collect();
    let t = std::time::Instant::now();
    let mut events = Vec::new();
    while events.len() < records.len() && t.elapsed() < Duration::from_secs(30) {
        events.extend(fx.events().into_iter().map(|(_, e)| e));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(events.len(), records.len());
    assert_valid(
        Some("result.v2.schema.json"),
        &[stored.clone(), events].concat(),
    );

    // The FHIR reports beside them.
    let reports: Vec<Value> = records
        .iter()
        .map(|r| get_json(&fx, r.fhir_report_uri.as_deref().expect("report written")))
        .collect();
    assert_valid(None, &reports);

    let classes = records[0].model.classes.clone();
    for (r, report) in records.iter().zip(&reports) {
        let graded: Vec<_> = r
            .images
            .iter()
            .filter(|i| i.status == ImageStatus::Ok)
            .collect();
        let expect_status = match (graded.len(), r.images.len()) {
            (0, _) => "cancelled",
            (g, n) if g < n => "partial",
            _ => "preliminary",
        };
        assert_eq!(report["status"], expect_status, "{report:#}");
        // One Observation per class probability and one grade per graded
        // image, plus the slide grade and its CIN2+ triage (the fixture's
        // bundle has a refer band).
        let obs = contained(report, "Observation");
        let slide = 2 * usize::from(r.slide_grade.is_some());
        assert_eq!(obs.len(), graded.len() * (classes.len() + 1) + slide);
        if let Some(g) = &r.slide_grade {
            let band = r
                .model
                .refer_band
                .as_ref()
                .expect("the fixture's refer band");
            let triage = g.triage.expect("a slide triage");
            let deciding = graded.iter().find(|i| i.uri == g.image_uri).unwrap();
            assert_eq!(g.p_cin2_plus, deciding.p_cin2_plus);
            let o = obs
                .iter()
                .find(|o| o["id"] == "slide-triage")
                .expect("the triage Observation");
            assert_eq!(
                o["valueCodeableConcept"]["coding"][0]["code"],
                triage.code()
            );
            assert_eq!(report["result"][1]["reference"], "#slide-triage");
            let component = |code: &str| {
                o["component"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|c| c["code"]["coding"][0]["code"] == code)
                    .unwrap_or_else(|| panic!("no {code} component"))["valueQuantity"]["value"]
                    .as_f64()
                    .unwrap()
            };
            assert_eq!(component("rule-out-threshold"), band.rule_out.threshold);
            assert_eq!(component("rule-in-specificity"), band.rule_in.specificity);
            assert!((component("p-cin2plus") - f64::from(g.p_cin2_plus.unwrap())).abs() <= 1e-6);
            assert!(report["conclusion"]
                .as_str()
                .unwrap()
                .contains(triage.as_str()));
            // Every graded image is triaged on its own P(CIN2+) by the same
            // band, or referred when it failed quality control.
            for img in &graded {
                let p = f64::from(img.p_cin2_plus.unwrap());
                let passed = img.quality.as_ref().unwrap().passed();
                let want = if passed {
                    band.triage(p)
                } else {
                    Triage::Refer
                };
                assert_eq!(img.triage, Some(want), "{}", img.uri);
            }
        }
        assert_eq!(report["result"].as_array().map_or(0, Vec::len), obs.len());
        // Links per graded image: its pre-drawn overlays (the predicted
        // class's) and the preprocessed image they are drawn on.
        let media = report["media"].as_array().map_or(0, Vec::len);
        let drawn: usize = graded.iter().map(|i| i.heatmaps.len()).sum();
        assert_eq!(drawn, graded.len());
        assert_eq!(media, drawn + graded.len());
        let urls: Vec<&str> = contained(report, "Media")
            .iter()
            .filter_map(|m| m["content"]["url"].as_str())
            .collect();
        for img in &graded {
            let pre = img.preprocessed_image.as_deref().unwrap();
            for url in img.heatmaps.iter().map(|h| h.overlay.as_str()).chain([pre]) {
                assert!(urls.contains(&url), "{url} not linked");
            }
            // The probabilities are the record's, to 1e-6 (rounded to 6 places).
            for (class, p) in img.probabilities.as_ref().unwrap() {
                let code = format!("probability-{class}");
                let v = obs
                    .iter()
                    .filter(|o| o["code"]["coding"][0]["code"] == code.as_str())
                    .find(|o| {
                        let src = o["derivedFrom"][0]["reference"].as_str().unwrap();
                        contained(report, "Media").iter().any(|m| {
                            format!("#{}", m["id"].as_str().unwrap()) == src
                                && m["content"]["url"] == img.uri.as_str()
                        })
                    })
                    .unwrap_or_else(|| panic!("no {code} for {}", img.uri));
                let got = v["valueQuantity"]["value"].as_f64().unwrap();
                assert!((got - f64::from(*p)).abs() <= 1e-6, "{got} vs {p}");
            }
        }
        // The model as a Device, with every file hash, wherever it graded something.
        let device = contained(report, "Device");
        assert_eq!(device.len(), usize::from(!graded.is_empty()));
        if let Some(d) = device.first() {
            let versions = d["version"].to_string();
            assert!(versions.contains(&r.model.version));
            for sha in r.model.sha256.values() {
                assert!(versions.contains(sha.as_str()), "hash {sha} missing");
            }
        }
        if let Some(g) = &r.slide_grade {
            assert_eq!(report["conclusionCode"][0]["text"], g.grade.as_str());
            assert!(report["conclusion"].as_str().unwrap().contains(&g.grade));
        }
    }

    // The slide with LIS ids: subject, specimen and order are set from them.
    let i = records
        .iter()
        .position(|r| r.job_id.as_deref() == Some(ok_job.as_str()))
        .expect("the enqueued slide's result");
    let report = &reports[i];
    assert_eq!(report["subject"]["identifier"]["value"], "PAT-001");
    assert_eq!(
        report["subject"]["identifier"]["system"],
        "urn:cinflow:patient-id"
    );
    assert_eq!(report["specimen"][0]["identifier"]["value"], "SP-9");
    assert_eq!(report["basedOn"][0]["identifier"]["value"], "ACC-77");
    assert_eq!(report["status"], "preliminary");
    // The malformed message's report says why nothing was graded.
    let bad = reports.last().unwrap();
    assert_eq!(bad["status"], "cancelled");
    assert!(
        bad["conclusion"].as_str().unwrap().contains("job_id"),
        "{bad:#}"
    );

    // The validators can fail: a report with a status FHIR does not have, an
    // Observation without its required code, a malformed instant, an element
    // R4 does not define, and a result missing its model.
    let mut wrong_status = report.clone();
    wrong_status["status"] = "graded".into();
    let mut no_code = report.clone();
    no_code["contained"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|r| r["resourceType"] == "Observation")
        .unwrap()
        .as_object_mut()
        .unwrap()
        .remove("code");
    let mut bad_instant = report.clone();
    bad_instant["issued"] = "yesterday".into();
    let mut unknown_element = report.clone();
    unknown_element["grade"] = "CIN2".into();
    for broken in [wrong_status, no_code, bad_instant, unknown_element] {
        let (ok, text) = validate_outputs(None, &[broken]);
        assert!(!ok && text.contains("INVALID"), "{text}");
    }
    let mut no_model = stored[i].clone();
    no_model.as_object_mut().unwrap().remove("model");
    let (ok, text) = validate_outputs(Some("result.v2.schema.json"), &[no_model]);
    assert!(
        !ok && text.contains("'model' is a required property"),
        "{text}"
    );
}
