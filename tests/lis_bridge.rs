//! `cinflow lis-bridge` against a stand-in LIS built from independent
//! libraries (tools/lis_peer.py: python-hl7's MLLP receiver validating each
//! ORU^R01 with hl7apy, and a FHIR server validating each transaction Bundle
//! with fhir.resources and carrying out its conditional updates), with real
//! results from a real inference worker on the real RabbitMQ and Garage.
//!
//! One run covers: delivery of a graded slide in both protocols with the
//! result's own numbers and codes and links a browser opens; a redelivered
//! result sent nowhere twice (receipts) and, without its receipt, updating
//! the FHIR server's report instead of adding one; a refusing LIS
//! (dead-lettered with the LIS's answer); an LIS that drops connections and
//! answers 503 (retried until accepted, once); a bridge killed while waiting
//! for an ACK (the restarted one delivers, with the same message control id);
//! and a result no LIS could file.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cinflow::result::codes::snomed_grade;
use cinflow::result::ResultRecord;
use cinflow::storage::ObjectStore;
use common::lis::{delete_bridge_queues, start_bridge, wait_for, Peer};
use common::worker::Fixture;
use serde_json::Value;

/// GET of an http:// URL with its own Host header (presigned URLs sign it): (status, body).
fn fetch(url: &str) -> (u16, Vec<u8>) {
    // The fragment stays in the browser.
    let url = url.split_once('#').map_or(url, |(u, _)| u);
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut s = std::net::TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, raw[head_end + 4..].to_vec())
}

/// An HL7 field (python-hl7 indexes MSH from MSH-1, the separator, like the rest).
fn field(seg: &[Value], n: usize) -> &str {
    seg.get(n).and_then(Value::as_str).unwrap_or("")
}

fn segments<'a>(msg: &'a Value, name: &str) -> Vec<&'a Vec<Value>> {
    msg["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_array().unwrap())
        .filter(|s| s[0] == name)
        .collect()
}

fn publish_result(fx: &Fixture, record: &[u8], id: &str) {
    fx.rt
        .block_on(cinflow::queue::publish_event(
            &fx.channel,
            &fx.amqp,
            "result.ok",
            id,
            record,
        ))
        .unwrap();
}

#[test]
fn results_reach_the_lis_in_hl7_and_fhir_once_and_refusals_are_dead_lettered() {
    let fx = Fixture::new("lisbridge", 4);
    let token = fx.tmp.path().join("fhir-token");
    std::fs::write(&token, "s3cret-token\n").unwrap();
    let peer = Peer::start(fx.tmp.path(), &token);
    let queue = format!("{}.lis", fx.prefix);
    let metrics = common::http::free_port();
    let worker = fx.spawn("infer", &[]);
    let mut bridge = start_bridge(&fx, &peer, &queue, &token, metrics, &[]);
    let images = fx.images(2, 640, 480);
    let job = |id: &str, patient: Option<&str>| {
        let mut j = fx.job(id, &images);
        j.patient_id = patient.map(str::to_string);
        j.specimen_id = Some(format!("SP-{id}"));
        j
    };

    // A graded slide, in both protocols.
    fx.publish(&job("a", Some("PAT-1")));
    // Not wait_graded: the bridge adds its receipts to the result set.
    let r = fx.wait_result("a", "v1", &worker);
    let report_of = |job: &str| format!("{job}:{}:v1", r.model.name);
    let hl7 = wait_for("the ORU of job a", Duration::from_secs(60), || {
        let m = peer.hl7_of("ACC-a");
        (!m.is_empty()).then(|| m[0].clone())
    });
    assert_eq!(hl7["valid"], true, "{hl7}");
    assert_eq!(hl7["answer"], "AA");
    assert_eq!(
        hl7["groups"],
        serde_json::json!(["ORU_R01_PATIENT", "ORU_R01_ORDER_OBSERVATION"])
    );
    let msh = segments(&hl7, "MSH")[0];
    assert_eq!(field(msh, 9), "ORU^R01^ORU_R01");
    assert_eq!(field(msh, 12), "2.5.1");
    assert_eq!(field(msh, 10), cinflow::lis::hl7::control_id(&r));
    assert_eq!(field(segments(&hl7, "PID")[0], 3), "PAT-1^^^LAB^MR");
    let obr = segments(&hl7, "OBR")[0];
    assert_eq!(field(obr, 2), "ACC-a");
    assert!(field(obr, 4).starts_with("65753-6^Cervix Pathology biopsy report^LN"));
    assert_eq!(field(obr, 25), "P");
    assert!(field(segments(&hl7, "NTE")[0], 3).starts_with("PRELIMINARY"));
    assert_eq!(field(segments(&hl7, "SPM")[0], 2), "SP-a&CINFLOW");
    let obx = segments(&hl7, "OBX");
    let find = |code: &str, sub: &str| {
        obx.iter()
            .find(|s| field(s, 3).starts_with(&format!("{code}^")) && field(s, 4) == sub)
            .unwrap_or_else(|| panic!("no OBX {code} sub-id {sub:?}: {obx:?}"))
    };
    let g = r.slide_grade.as_ref().unwrap();
    let grade = field(find("slide-grade", ""), 5);
    match snomed_grade(&g.grade) {
        Some((code, _)) => assert!(grade.starts_with(&format!("{code}^")), "{grade}"),
        None => assert!(grade.starts_with("grade-"), "{grade}"),
    }
    assert!(grade.ends_with(&format!("^{}^99CIN", g.grade)), "{grade}");
    assert!(obx.iter().all(|s| field(s, 11) == "P"));
    // Every probability as the record has it (written with 6 decimals).
    for (n, img) in r.images.iter().enumerate() {
        for (class, p) in img.probabilities.as_ref().unwrap() {
            let v: f64 = field(
                find(&format!("probability-{class}"), &(n + 1).to_string()),
                5,
            )
            .parse()
            .unwrap();
            assert!((v - f64::from(*p)).abs() <= 5e-7, "{class}: {v} vs {p}");
        }
    }
    // Links a browser opens: the viewer page, presigned.
    let viewer = field(find("viewer", ""), 5).to_string();
    assert!(
        viewer.starts_with("http://") && viewer.contains("X-Amz-Signature="),
        "{viewer}"
    );
    let (status, page) = fetch(&viewer);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&page));
    assert!(String::from_utf8_lossy(&page).contains("<html"));
    // The page loads its image from beside it, with the signature its link
    // carries (cinflow::viewer::presigned_link): opened in headless Chromium
    // from the link alone, every image loads and is drawn exactly.
    assert!(viewer.contains("#sig="), "{viewer}");
    let opened: Value = serde_json::from_str(
        common::run_python("tools/test_viewer.py", &["--load", &viewer])
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    let expected: Vec<Value> = r
        .images
        .iter()
        .map(|i| {
            let shown = format!("{}/grad-cam", i.predicted_class.as_ref().unwrap());
            serde_json::json!({"loaded": "true", "drawing": "exact", "shown": shown})
        })
        .collect();
    assert_eq!(opened["figures"], Value::from(expected), "{opened}");
    assert_eq!(
        opened["external_requests"],
        serde_json::json!([]),
        "{opened}"
    );
    assert_eq!(opened["console_errors"], serde_json::json!([]), "{opened}");
    let (status, jpeg) = fetch(field(find("preprocessed-image", "1"), 5));
    assert_eq!((status, &jpeg[..2]), (200, &[0xFF, 0xD8][..]));

    let fhir = wait_for("the Bundle of job a", Duration::from_secs(60), || {
        let b = peer.fhir_of(&report_of("a"));
        (!b.is_empty()).then(|| b[0].clone())
    });
    assert_eq!(
        (fhir["valid"].clone(), fhir["status"].clone()),
        (Value::Bool(true), 200.into()),
        "{fhir}"
    );
    let report_id = report_of("a");
    let store = peer.store();
    let reports: Vec<&Value> = store["DiagnosticReport"]
        .as_object()
        .unwrap()
        .values()
        .filter(|d| d["identifier"][0]["value"] == report_id.as_str())
        .collect();
    assert_eq!(reports.len(), 1);
    let report = reports[0];
    assert_eq!(report["meta"]["security"][0]["code"], "AIAST");
    assert_eq!(report["code"]["coding"][0]["code"], "65753-6");
    assert_eq!(report["status"], "preliminary");
    assert!(report.get("contained").is_none());
    let observations: Vec<&Value> = store["Observation"]
        .as_object()
        .unwrap()
        .values()
        .filter(|o| {
            o["identifier"][0]["value"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{report_id}/"))
        })
        .collect();
    // Per image a grade and 4 probabilities, plus the slide grade and triage.
    assert_eq!(observations.len(), 2 * 5 + 2);
    assert_eq!(
        report["result"].as_array().unwrap().len(),
        observations.len()
    );
    let slide = observations
        .iter()
        .find(|o| o["identifier"][0]["value"] == format!("{report_id}/slide-grade").as_str())
        .unwrap();
    assert_eq!(slide["meta"]["security"][0]["code"], "AIAST");
    assert_eq!(slide["valueCodeableConcept"]["text"], g.grade.as_str());
    if let Some((code, _)) = snomed_grade(&g.grade) {
        assert_eq!(
            slide["valueCodeableConcept"]["coding"][0]["system"],
            "http://snomed.info/sct"
        );
        assert_eq!(slide["valueCodeableConcept"]["coding"][0]["code"], code);
    }
    let provenance: Vec<&Value> = store["Provenance"].as_object().unwrap().values().collect();
    assert_eq!(provenance.len(), 1);
    let report_ref = format!("DiagnosticReport/{}", report["id"].as_str().unwrap());
    assert_eq!(provenance[0]["target"][0]["reference"], report_ref.as_str());
    let device = provenance[0]["agent"][0]["who"]["reference"]
        .as_str()
        .unwrap();
    assert!(device.starts_with("Device/"), "{device}");
    let hl7_receipt = r
        .result_uri
        .as_deref()
        .unwrap()
        .replace("result.json", "lis/hl7.json");
    let key = |uri: &str| {
        uri.strip_prefix(&format!("s3://{}/", fx.s3.bucket))
            .unwrap()
            .to_string()
    };
    let receipt: Value =
        serde_json::from_slice(&fx.store.get(&key(&hl7_receipt)).unwrap()).unwrap();
    assert_eq!(receipt["answer"], "AA");

    // Redelivered: sent nowhere twice; without its FHIR receipt, the server's
    // report is updated, not duplicated.
    let record = fx
        .store
        .get(&key(r.result_uri.as_deref().unwrap()))
        .unwrap();
    publish_result(&fx, &record, "a-again");
    wait_for("the skipped redelivery", Duration::from_secs(30), || {
        let m = common::http::get(metrics, "/metrics")?.1;
        (common::http::sample(
            &m,
            "cinflow_lis_deliveries_total{destination=\"fhir\",outcome=\"skipped\"}",
        ) >= 1.0)
            .then_some(())
    });
    fx.store
        .delete(&key(&hl7_receipt.replace("hl7.json", "fhir.json")))
        .unwrap();
    publish_result(&fx, &record, "a-once-more");
    wait_for("the repeated Bundle", Duration::from_secs(30), || {
        (peer.fhir_of(&report_id).len() == 2).then_some(())
    });
    let again = &peer.fhir_of(&report_id)[1];
    assert_eq!(again["status"], 200);
    let statuses: Vec<&str> = again["answer"]["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap())
        .collect();
    assert!(statuses.iter().all(|s| *s == "200 OK"), "{statuses:?}");
    let store = peer.store();
    let count = |kind: &str| store[kind].as_object().map_or(0, |o| o.len());
    assert_eq!(
        (
            count("DiagnosticReport"),
            count("Provenance"),
            count("Device")
        ),
        (1, 1, 1)
    );
    assert_eq!(count("Observation"), 12);
    assert_eq!(peer.hl7_of("ACC-a").len(), 1);

    // A refusing LIS: dead-lettered with its answers.
    fx.publish(&job("b", Some("REFUSE-9")));
    let dead = fx.dead_letters_in(&format!("{queue}.dlq"), 1);
    assert_eq!(dead.len(), 1);
    let (_, reason, body) = &dead[0];
    assert!(
        reason.contains("hl7: the LIS at") && reason.contains("answered AR"),
        "{reason}"
    );
    assert!(reason.contains("unknown patient REFUSE-9"), "{reason}");
    assert!(
        reason.contains("fhir: FHIR server") && reason.contains("HTTP 422"),
        "{reason}"
    );
    let dead_record: ResultRecord = serde_json::from_slice(body).unwrap();
    assert_eq!(dead_record.job_id.as_deref(), Some("b"));

    // Dropped connections and 503s: retried until accepted, once.
    peer.control("hl7_fail=2&fhir_fail=2");
    fx.publish(&job("c", Some("PAT-3")));
    fx.wait_result("c", "v1", &worker);
    wait_for("job c accepted", Duration::from_secs(60), || {
        let h = peer.hl7_of("ACC-c");
        let f = peer.fhir_of(&report_of("c"));
        (h.iter().any(|m| m["answer"] == "AA") && f.iter().any(|b| b["status"] == 200))
            .then_some(())
    });
    let answers: Vec<String> = peer
        .hl7_of("ACC-c")
        .iter()
        .map(|m| m["answer"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(answers, ["dropped", "dropped", "AA"]);
    let fhir_c: Vec<i64> = peer
        .fhir_of(&report_of("c"))
        .iter()
        .map(|b| b["status"].as_i64().unwrap())
        .collect();
    assert!(
        fhir_c.iter().filter(|s| **s == 503).count() <= 2
            && fhir_c.iter().filter(|s| **s == 200).count() == 1,
        "{fhir_c:?}"
    );
    assert_eq!(
        peer.entries("fhir")
            .iter()
            .filter(|e| e["status"] == 503)
            .count(),
        2
    );

    // Killed while waiting for an ACK: the restarted bridge delivers, with
    // the same control id; the FHIR server still has one report.
    peer.control("hl7_delay_s=30");
    fx.publish(&job("d", Some("PAT-4")));
    fx.wait_result("d", "v1", &worker);
    wait_for("job d's ORU", Duration::from_secs(60), || {
        (!peer.hl7_of("ACC-d").is_empty()).then_some(())
    });
    bridge.signal("KILL");
    bridge.wait_exit(Duration::from_secs(10)).expect("killed");
    peer.control("hl7_delay_s=0");
    let bridge2 = start_bridge(&fx, &peer, &queue, &token, common::http::free_port(), &[]);
    wait_for(
        "job d delivered after the restart",
        Duration::from_secs(90),
        || {
            (peer.hl7_of("ACC-d").len() == 2 && !peer.fhir_of(&report_of("d")).is_empty())
                .then_some(())
        },
    );
    let ids: Vec<String> = peer
        .hl7_of("ACC-d")
        .iter()
        .map(|m| field(segments(m, "MSH")[0], 10).to_string())
        .collect();
    assert_eq!(ids[0], ids[1]);
    let rd = fx.result("d", "v1").unwrap();
    let receipt = rd
        .result_uri
        .as_deref()
        .unwrap()
        .replace("result.json", "lis/fhir.json");
    wait_for("job d's receipts", Duration::from_secs(30), || {
        fx.store.exists(&key(&receipt)).unwrap().then_some(())
    });

    // A result no LIS could file: dead-lettered, named.
    let mut e = job("e", None);
    e.accession_id = None;
    fx.publish(&e);
    let dead = fx.dead_letters_in(&format!("{queue}.dlq"), 1);
    assert_eq!(dead.len(), 1, "{}", bridge2.log());
    assert!(
        dead[0]
            .1
            .contains("names neither a patient nor an accession id"),
        "{}",
        dead[0].1
    );
    assert!(peer.fhir_of(&report_of("e")).is_empty());

    delete_bridge_queues(&fx, &queue);
}

/// Sends HL7 messages with python-hl7's MLLP client (tools/hl7_send.py); the ACKs.
fn send_hl7(port: u16, dir: &Path, messages: &[&str]) -> Vec<cinflow::lis::hl7::Ack> {
    let files: Vec<PathBuf> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let f = dir.join(format!("msg-{}-{i}.hl7", common::unique_prefix("m")));
            std::fs::write(&f, m).unwrap();
            f
        })
        .collect();
    let out = common::output_ok(
        Command::new(common::python())
            .arg(common::root().join("tools/hl7_send.py"))
            .args(["127.0.0.1", &port.to_string()])
            .args(&files),
    );
    out.split("\n\n")
        .filter(|a| !a.trim().is_empty())
        .map(|a| cinflow::lis::hl7::parse_ack(a).unwrap())
        .collect()
}

/// A final (or corrected) ORU^R01 as a pathology LIS sends it: the accession
/// as filler order number, the diagnosis as a coded OBX.
fn signout(id: &str, accession: &str, status: &str, diagnosis: &str) -> String {
    format!(
        "MSH|^~\\&|LIS|PATH|CINFLOW|LAB|20261201093000+0100||ORU^R01^ORU_R01|{id}|P|2.5.1\r\
PID|1||PAT-7^^^HOSP^MR\r\
ORC|RE|ORD-{id}|{accession}^LIS\r\
OBR|1|ORD-{id}|{accession}^LIS|65753-6^Cervix Pathology biopsy report^LN|||20261130|||||||||||||||20261201091500+0100|||{status}\r\
OBX|1|CWE|22637-3^Pathology report final diagnosis^LN||{diagnosis}||||||{status}\r\
OBX|2|TX|22637-3^Pathology report final diagnosis^LN||Cervix, biopsy: see above||||||{status}"
    )
}

/// POSTs FHIR resources with tools/fhir_post.py (each validated with
/// fhir.resources first): (status, OperationOutcome) per resource.
fn post_fhir(url: &str, dir: &Path, docs: &[serde_json::Value]) -> Vec<(u16, Value)> {
    let files: Vec<PathBuf> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let f = dir.join(format!("fhir-{}-{i}.json", common::unique_prefix("f")));
            std::fs::write(&f, d.to_string()).unwrap();
            f
        })
        .collect();
    let out = common::output_ok(
        Command::new(common::python())
            .arg(common::root().join("tools/fhir_post.py"))
            .arg(url)
            .args(&files),
    );
    out.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["status"].as_u64().unwrap() as u16, v["body"].clone())
        })
        .collect()
}

/// A signed-out DiagnosticReport as a FHIR-speaking LIS sends it.
fn fhir_signout(accession: &str, status: &str, system: &str, code: &str) -> Value {
    serde_json::json!({
        "resourceType": "DiagnosticReport",
        "id": format!("lis-{accession}"),
        "status": status,
        "identifier": [{
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "system": "urn:lab:accession",
            "value": accession,
        }],
        "code": {"coding": [{"system": "http://loinc.org", "code": "65753-6"}]},
        "subject": {"identifier": {"value": "PAT-7"}},
        "issued": "2026-12-02T10:00:00+01:00",
        "conclusionCode": [{"coding": [{"system": system, "code": code}]}],
    })
}

fn manifest_rows(fx: &Fixture, key: &str) -> Vec<Vec<String>> {
    let bytes = fx.store.get(key).unwrap();
    let mut r = csv::Reader::from_reader(bytes.as_slice());
    assert_eq!(
        r.headers().unwrap().iter().collect::<Vec<_>>(),
        cinflow::lis::signout::MANIFEST_COLUMNS
    );
    r.records()
        .map(|x| x.unwrap().iter().map(str::to_string).collect())
        .collect()
}

#[test]
fn signed_out_diagnoses_become_training_rows_once() {
    let fx = Fixture::new("signout", 4);
    let queue = format!("{}.lis", fx.prefix);
    let prefix = format!("{}/signouts", fx.prefix);
    let manifest = format!("{prefix}/labels.csv");
    // The lab's own training rows, kept through every update.
    fx.store
        .put(
            &manifest,
            b"path,label,patient_id\ns3://lab/own/1.jpg,CIN1,P-OWN\n",
            "text/csv",
        )
        .unwrap();
    let map = fx.tmp.path().join("signout-map.csv");
    std::fs::write(&map, "system,code,grade\nL,NEG,Non-neoplasm\n").unwrap();
    let worker = fx.spawn("infer", &[]);
    let fhir_port = common::http::free_port();
    let start = |port: u16| {
        let metrics = common::http::free_port();
        let w = fx.spawn_command(
            &[
                "lis-bridge",
                "--lis-queue",
                &queue,
                "--signout-mllp",
                &format!("127.0.0.1:{port}"),
                "--signout-fhir",
                &format!("127.0.0.1:{fhir_port}"),
                "--signout-prefix",
                &format!("s3://{}/{prefix}", fx.s3.bucket),
                "--signout-map",
                map.to_str().unwrap(),
            ],
            &[("CINFLOW_METRICS_ADDR", &format!("127.0.0.1:{metrics}"))],
        );
        wait_for("the bridge to be ready", Duration::from_secs(60), || {
            (common::http::get(metrics, "/readyz").map(|r| r.0) == Some(200)).then_some(())
        });
        (w, metrics)
    };
    let port = common::http::free_port();
    let (mut bridge, metrics) = start(port);

    // Two slides of one case and one of another, graded and seen by the bridge.
    let images = fx.images(2, 640, 480);
    let mut jobs = Vec::new();
    for (id, accession, imgs) in [
        ("s1", "S26-0042", &images[..]),
        ("s2", "S26-0042", &images[..1]),
        ("s3", "S26-0050", &images[1..]),
    ] {
        let mut j = fx.job(id, imgs);
        j.accession_id = Some(accession.into());
        j.patient_id = Some("PAT-7".into());
        fx.publish(&j);
        jobs.push(j);
    }
    for j in &jobs {
        fx.wait_result(&j.job_id, "v1", &worker);
    }
    wait_for("the order index", Duration::from_secs(60), || {
        let orders = fx.store.list(&format!("{prefix}/orders/")).unwrap();
        (orders.len() == 3).then_some(())
    });

    // A final CIN 2: every graded image of the case's two slides, once.
    let dir = fx.tmp.path();
    let cin2 = signout(
        "LIS1",
        "S26-0042",
        "F",
        "285838002^Cervical intraepithelial neoplasia grade 2^SCT",
    );
    let acks = send_hl7(port, dir, &[&cin2, &cin2]);
    assert_eq!(acks.len(), 2);
    for a in &acks {
        assert_eq!((a.code.as_str(), a.control_id.as_str()), ("AA", "LIS1"));
        assert!(
            a.text
                .contains("recorded accession S26-0042 as CIN2 for training (3 images)"),
            "{}",
            a.text
        );
    }
    let rows = manifest_rows(&fx, &manifest);
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!(rows[0][..3], ["s3://lab/own/1.jpg", "CIN1", "P-OWN"]);
    for r in &rows[1..] {
        assert_eq!(
            (r[1].as_str(), r[2].as_str(), r[4].as_str()),
            ("CIN2", "PAT-7", "S26-0042")
        );
        assert_eq!(r[5], "2026-12-01T08:15:00Z");
        assert!(images.contains(&r[0]), "{r:?}");
    }
    let jobs_of: Vec<&str> = rows[1..].iter().map(|r| r[6].as_str()).collect();
    assert_eq!(jobs_of, ["s1", "s1", "s2"]);
    let case: serde_json::Value = serde_json::from_slice(
        &fx.store
            .get(&format!("{prefix}/cases/S26-0042.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (case["grade"].clone(), case["status"].clone()),
        ("CIN2".into(), "final".into())
    );

    // Corrected to CIN 3: the case's rows replaced, not added.
    let corrected = signout("LIS2", "S26-0042", "C", "20365006^CIN 3^SCT");
    let unknown = signout("LIS3", "S26-0042", "F", "999999^Something else^SCT");
    let negative = signout("LIS4", "S26-0050", "F", "NEG^negative^L");
    let elsewhere = signout("LIS5", "S99-0001", "F", "20365006^CIN 3^SCT");
    let prelim = signout("LIS6", "S26-0050", "P", "20365006^CIN 3^SCT");
    let acks = send_hl7(
        port,
        dir,
        &[&corrected, &unknown, &negative, &elsewhere, &prelim],
    );
    let codes: Vec<&str> = acks.iter().map(|a| a.code.as_str()).collect();
    assert_eq!(codes, ["AA", "AE", "AA", "AA", "AA"], "{acks:?}");
    assert!(
        acks[1]
            .text
            .contains("no training grade for the diagnoses SCT 999999 (Something else)"),
        "{}",
        acks[1].text
    );
    assert!(
        acks[3].text.contains("no slide of order S99-0001"),
        "{}",
        acks[3].text
    );
    assert!(acks[4].text.contains("not final"), "{}", acks[4].text);
    let rows = manifest_rows(&fx, &manifest);
    let labels: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r[4].as_str(), r[1].as_str()))
        .collect();
    assert_eq!(
        labels,
        [
            ("", "CIN1"),
            ("S26-0042", "CIN3"),
            ("S26-0042", "CIN3"),
            ("S26-0042", "CIN3"),
            ("S26-0050", "Non-neoplasm")
        ]
    );
    // The same through FHIR: an amended DiagnosticReport (CIN 1) replaces
    // the second case's rows; an unknown code is a 422 naming it.
    let url = format!("http://127.0.0.1:{fhir_port}/fhir/DiagnosticReport");
    let answers = post_fhir(
        &url,
        dir,
        &[
            fhir_signout("S26-0050", "amended", "http://snomed.info/sct", "285836003"),
            fhir_signout("S26-0050", "final", "http://snomed.info/sct", "999999"),
        ],
    );
    assert_eq!(answers[0].0, 201, "{answers:?}");
    assert_eq!(answers[0].1["resourceType"], "OperationOutcome");
    assert_eq!(answers[1].0, 422, "{answers:?}");
    let why = answers[1].1["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(why.contains("http://snomed.info/sct 999999"), "{why}");
    let rows = manifest_rows(&fx, &manifest);
    let last = rows.last().unwrap();
    assert_eq!(
        (last[1].as_str(), last[4].as_str(), last[5].as_str()),
        ("CIN1", "S26-0050", "2026-12-02T09:00:00Z")
    );
    assert_eq!(rows.len(), 5);

    let m = common::http::get(metrics, "/metrics").unwrap().1;
    assert_eq!(
        common::http::sample(&m, "cinflow_lis_signouts_total{outcome=\"recorded\"}"),
        5.0
    );
    assert_eq!(
        common::http::sample(
            &m,
            "cinflow_lis_signouts_total{outcome=\"unknown_diagnosis\"}"
        ),
        2.0
    );

    // A manifest update lost (two bridges writing at once): the restarted
    // bridge rebuilds it from the cases, keeping the lab's rows.
    let before = fx.store.get(&manifest).unwrap();
    fx.store
        .put(
            &manifest,
            b"path,label,patient_id\ns3://lab/own/1.jpg,CIN1,P-OWN\n",
            "text/csv",
        )
        .unwrap();
    bridge.signal("KILL");
    bridge.wait_exit(Duration::from_secs(10)).expect("killed");
    let (_bridge, _) = start(port);
    assert_eq!(fx.store.get(&manifest).unwrap(), before);

    delete_bridge_queues(&fx, &queue);
}
