//! The FHIR R4 `DiagnosticReport` written beside each result JSON, for a LIS
//! that reads clinical formats rather than cinflow's own record.
//!
//! The report is self-contained: the model is a contained `Device`, each
//! scanned image and each heatmap a contained `Media`, and the findings
//! contained `Observation`s (one per class probability and one predicted grade
//! per image with its P(CIN2+) and triage as components, plus the slide grade
//! and the slide's CIN2+ triage with its thresholds and their validation
//! sensitivity and specificity). It is always `preliminary` (or `partial`
//! when images failed, `cancelled` when nothing was graded): a computer-assisted
//! grade for a pathologist to review, never a signed-out diagnosis.
//! Patient, specimen and order are logical references by identifier, in the
//! identifier systems the lab configures. Grades carry SNOMED CT codes, the
//! report LOINC codes, and cinflow's own codes one fixed code system
//! ([`super::codes`]); the report and its findings carry the AI-asserted
//! security label (`AIAST`).
//!
//! Two packagings of the same content: [`diagnostic_report`], the
//! self-contained report stored beside the result, and [`transaction`], a
//! transaction `Bundle` for a FHIR server (`cinflow lis-bridge`) in which every
//! finding is an entry of its own that the server can search, each written by
//! a conditional update on its identifier (so a redelivered result updates
//! instead of duplicating), with a `Provenance` naming the model as author.

use serde_json::{json, Value};

use super::codes::{
    snomed_grade, AI_ASSERTED, CODE_SYSTEM, LOINC, LOINC_CERVIX_BIOPSY, LOINC_PATHOLOGY_STUDY,
    SNOMED, UCUM,
};
use super::{ImageStatus, ResultRecord};

/// Identifier systems of the lab's ids, under one base (`--fhir-system`).
#[derive(Debug, Clone)]
pub struct Systems {
    base: String,
}

impl Systems {
    pub fn new(base: &str) -> Systems {
        Systems {
            base: base.trim_end_matches(['/', ':']).to_string(),
        }
    }

    /// `urn:x` + `patient-id` gives `urn:x:patient-id`; `https://lab/ids`
    /// gives `https://lab/ids/patient-id`.
    pub fn system(&self, what: &str) -> String {
        if self.base.starts_with("urn:") {
            format!("{}:{what}", self.base)
        } else {
            format!("{}/{what}", self.base)
        }
    }
}

fn coded(system: &str, code: &str, display: &str) -> Value {
    json!({ "coding": [{ "system": system, "code": code, "display": display }], "text": display })
}

/// A grade: its SNOMED CT concept where one means exactly it, and cinflow's code.
pub fn grade_concept(class: &str) -> Value {
    let mut coding = Vec::new();
    if let Some((code, display)) = snomed_grade(class) {
        coding.push(json!({ "system": SNOMED, "code": code, "display": display }));
    }
    coding.push(
        json!({ "system": CODE_SYSTEM, "code": super::codes::grade_code(class), "display": class }),
    );
    json!({ "coding": coding, "text": class })
}

/// cinflow's own code (observation kinds, triage).
fn local(code: &str, text: &str) -> Value {
    coded(CODE_SYSTEM, code, text)
}

/// `meta` of what the model asserted: the AI-asserted security label.
fn ai_meta() -> Value {
    let (system, code, display) = AI_ASSERTED;
    json!({ "security": [{ "system": system, "code": code, "display": display }] })
}

fn identifier(system: String, value: &str) -> Value {
    json!({ "system": system, "value": value })
}

/// A contained resource's local id (FHIR ids: letters, digits, '-', '.').
fn local_id(parts: &[&str]) -> String {
    parts
        .iter()
        .map(|p| {
            p.chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("-")
}

fn reference(id: &str) -> Value {
    json!({ "reference": format!("#{id}") })
}

/// The DiagnosticReport of `r` (its `result_uri` should be set, so the report
/// can point back to the full record).
pub fn diagnostic_report(r: &ResultRecord, sys: &Systems) -> Value {
    let job = r.job_id.as_deref().unwrap_or("unidentified");
    let model = &r.model;

    let mut versions = vec![json!({ "type": { "text": "model version" }, "value": model.version })];
    for (file, sha) in &model.sha256 {
        versions.push(json!({ "type": { "text": format!("sha256 of {file}") }, "value": sha }));
    }
    versions
        .push(json!({ "type": { "text": "preprocess version" }, "value": r.preprocess.version }));
    let device = json!({
        "resourceType": "Device",
        "id": "model",
        "status": "active",
        "manufacturer": "cinflow",
        "deviceName": [{ "name": model.name, "type": "model-name" }],
        "type": { "text": format!("CIN grading model ({}, {} classes, {})", model.architecture, model.classes.len(), r.execution_provider) },
        "version": versions,
    });

    let subject = r.ids.patient_id.as_ref().map(
        |p| json!({ "type": "Patient", "identifier": identifier(sys.system("patient-id"), p) }),
    );
    let specimen = r.ids.specimen_id.as_ref().map(
        |s| json!([{ "type": "Specimen", "identifier": identifier(sys.system("specimen-id"), s) }]),
    );
    let based_on = r.ids.accession_id.as_ref().map(|a| {
        json!([{
            "type": "ServiceRequest",
            "identifier": {
                "type": coded("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN", "Accession ID"),
                "system": sys.system("accession-id"),
                "value": a,
            }
        }])
    });
    let with_context = |mut v: Value| {
        if let Some(s) = &subject {
            v["subject"] = s.clone();
        }
        v
    };
    // Every finding: a preliminary imaging Observation by the model, derived
    // from the image it was read on.
    let observation = |id: &str,
                       code: Value,
                       method: &str,
                       value: (&str, Value),
                       from: Option<&str>| {
        let mut o = with_context(json!({
            "resourceType": "Observation",
            "id": id,
            "meta": ai_meta(),
            "status": "preliminary",
            "category": [coded("http://terminology.hl7.org/CodeSystem/observation-category", "imaging", "Imaging")],
            "code": code,
            "method": { "text": method },
            "device": reference("model"),
        }));
        o[value.0] = value.1;
        if let Some(src) = from {
            o["derivedFrom"] = json!([reference(src)]);
        }
        o
    };
    const METHOD: &str = "ONNX backbone + linear head (cinflow); computer-assisted, not reviewed";

    // Contained resources must be referenced from the report (dom-3): the
    // model and the source images appear only with findings that cite them.
    let mut contained = Vec::new();
    let mut results = Vec::new();
    let mut media = Vec::new();
    for (n, img) in r.images.iter().enumerate() {
        let image_no = (n + 1).to_string();
        let source_id = local_id(&["image", &image_no]);
        let (Some(probs), Some(pred)) = (&img.probabilities, &img.predicted_class) else {
            continue;
        };
        contained.push(with_context(json!({
            "resourceType": "Media",
            "id": source_id,
            "status": "completed",
            "type": coded("http://terminology.hl7.org/CodeSystem/media-type", "image", "Image"),
            "content": { "contentType": content_type(&img.uri), "url": img.uri, "title": format!("image {image_no}") },
        })));
        for class in &model.classes {
            let Some(p) = probs.get(class) else { continue };
            let id = local_id(&["prob", &image_no, class]);
            contained.push(observation(
                &id,
                local(
                    &format!("probability-{class}"),
                    &format!("Probability of {class}"),
                ),
                METHOD,
                ("valueQuantity", probability(f64::from(*p))),
                Some(&source_id),
            ));
            results.push(reference(&id));
        }
        let id = local_id(&["grade", &image_no]);
        let mut grade = observation(
            &id,
            local(
                "image-grade",
                &format!("Predicted grade of image {image_no}"),
            ),
            METHOD,
            ("valueCodeableConcept", grade_concept(pred)),
            Some(&source_id),
        );
        let mut parts = Vec::new();
        if let Some(p) = img.p_cin2_plus {
            parts.push(json!({
                "code": local("p-cin2plus", "Probability of CIN2+"),
                "valueQuantity": probability(f64::from(p)),
            }));
        }
        if let Some(t) = img.triage {
            parts.push(json!({
                "code": local("cin2plus-triage", "CIN2+ triage"),
                "valueCodeableConcept": local(t.code(), t.as_str()),
            }));
        }
        if !parts.is_empty() {
            grade["component"] = Value::Array(parts);
        }
        if let Some(q) = img.quality.as_ref().filter(|q| !q.passed()) {
            grade["note"] = json!([{ "text": format!(
                "Failed input quality control, so referred and left out of the slide grade: {}",
                q.summary()
            ) }]);
        }
        contained.push(grade);
        results.push(reference(&id));
        for h in &img.heatmaps {
            let id = local_id(&["heatmap", &image_no, &h.class]);
            contained.push(with_context(model_media(
                &id,
                "Grad-CAM heatmap overlay",
                &h.overlay,
                &format!("Grad-CAM {} on image {image_no}", h.class),
                &format!(
                    "Grad-CAM of {} drawn over image {image_no} ({}) as the model sees it",
                    h.class, img.uri
                ),
            )));
            media.push(json!({
                "comment": format!("Grad-CAM evidence for {} on image {image_no} (full red = {:.3} logit units)", h.class, h.scale),
                "link": reference(&id),
            }));
        }
        if let Some(pre) = &img.preprocessed_image {
            let id = local_id(&["preprocessed", &image_no]);
            contained.push(with_context(model_media(
                &id,
                "Preprocessed image (CLAHE, resized) as the model sees it",
                pre,
                &format!("Image {image_no} as graded"),
                &format!(
                    "Image {image_no} ({}) after CLAHE and resizing; every class's Grad-CAM can be drawn over it from the raw maps",
                    img.uri
                ),
            )));
            media.push(json!({
                "comment": format!("Image {image_no} as the model saw it"),
                "link": reference(&id),
            }));
        }
    }
    if let Some(g) = &r.slide_grade {
        let from = r
            .images
            .iter()
            .position(|i| i.uri == g.image_uri)
            .map(|n| local_id(&["image", &(n + 1).to_string()]));
        contained.push(observation(
            "slide-grade",
            local(
                "slide-grade",
                "Slide grade (the image with the highest P(CIN2+))",
            ),
            &format!("rule: {}", g.rule),
            ("valueCodeableConcept", grade_concept(&g.grade)),
            from.as_deref(),
        ));
        results.insert(0, reference("slide-grade"));
        if let (Some(t), Some(p), Some(band)) = (g.triage, g.p_cin2_plus, &model.refer_band) {
            let component = |code: &str, text: &str, v: f64| json!({ "code": local(code, text), "valueQuantity": probability(v) });
            let mut o = observation(
                "slide-triage",
                local("cin2plus-triage", "CIN2+ triage of the slide"),
                &format!(
                    "P(CIN2+) of the deciding image against two thresholds chosen on the {} split: below rule-out, CIN2+ unlikely; at or above rule-in, CIN2+ likely; between, or images not graded, refer",
                    band.fitted_on
                ),
                ("valueCodeableConcept", local(t.code(), t.as_str())),
                from.as_deref(),
            );
            o["component"] = json!([
                component(
                    "p-cin2plus",
                    "Probability of CIN2+ (deciding image)",
                    f64::from(p)
                ),
                component(
                    "rule-out-threshold",
                    "Rule-out threshold on P(CIN2+)",
                    band.rule_out.threshold
                ),
                component(
                    "rule-out-sensitivity",
                    "CIN2+ sensitivity at the rule-out threshold (validation)",
                    band.rule_out.sensitivity
                ),
                component(
                    "rule-out-specificity",
                    "CIN2+ specificity at the rule-out threshold (validation)",
                    band.rule_out.specificity
                ),
                component(
                    "rule-in-threshold",
                    "Rule-in threshold on P(CIN2+)",
                    band.rule_in.threshold
                ),
                component(
                    "rule-in-sensitivity",
                    "CIN2+ sensitivity at the rule-in threshold (validation)",
                    band.rule_in.sensitivity
                ),
                component(
                    "rule-in-specificity",
                    "CIN2+ specificity at the rule-in threshold (validation)",
                    band.rule_in.specificity
                ),
            ]);
            o["note"] = json!([{ "text": format!(
                "{}. Thresholds chosen on {} {} images ({} CIN2+, {} CIN1 or less).",
                g.triage_reason.as_deref().unwrap_or(t.as_str()),
                band.positives + band.negatives,
                band.fitted_on,
                band.positives,
                band.negatives
            ) }]);
            contained.push(o);
            results.insert(1, reference("slide-triage"));
        }
    }

    if !results.is_empty() {
        contained.insert(0, device);
    }
    let graded = r
        .images
        .iter()
        .filter(|i| i.status == ImageStatus::Ok)
        .count();
    let status = match (graded, r.images.len()) {
        (0, _) => "cancelled",
        (g, n) if g < n => "partial",
        _ => "preliminary",
    };
    let mut conclusion = match &r.slide_grade {
        Some(g) => format!(
            "Computer-assisted grade (preliminary, for pathologist review): {} — that of the image with the highest P(CIN2+) among {graded} graded image(s), by model {} version {}.",
            g.grade, model.name, model.version
        ),
        None => "No image could be graded; no computer-assisted grade.".to_string(),
    };
    if let Some((t, why)) = r
        .slide_grade
        .as_ref()
        .and_then(|g| Some((g.triage?, g.triage_reason.as_deref()?)))
    {
        conclusion.push_str(&format!(" CIN2+ triage: {t} ({why})."));
    }
    if let Some(e) = &r.error {
        conclusion.push_str(&format!(" Not graded: {e}"));
    }

    let mut identifiers = vec![identifier(
        sys.system("cinflow-result"),
        &format!("{job}:{}:{}", model.name, model.version),
    )];
    if let Some(s) = &r.slide_id {
        identifiers.push(identifier(sys.system("slide-id"), s));
    }
    let mut report = json!({
        "resourceType": "DiagnosticReport",
        "id": local_id(&[job]).chars().take(64).collect::<String>(),
        "meta": ai_meta(),
        "contained": contained,
        "identifier": identifiers,
        "status": status,
        "category": [coded("http://terminology.hl7.org/CodeSystem/v2-0074", "SP", "Surgical Pathology")],
        "code": {
            "coding": [
                { "system": LOINC, "code": LOINC_CERVIX_BIOPSY.0, "display": LOINC_CERVIX_BIOPSY.1 },
                { "system": LOINC, "code": LOINC_PATHOLOGY_STUDY.0, "display": LOINC_PATHOLOGY_STUDY.1 },
            ],
            "text": "Cervical biopsy CIN grade, computer-assisted (cinflow)",
        },
        "effectiveDateTime": r.created_at,
        "issued": r.created_at,
        "result": results,
        "conclusion": conclusion,
    });
    // FHIR JSON has no empty arrays.
    if let Some(obj) = report.as_object_mut() {
        obj.retain(|_, v| !v.as_array().is_some_and(Vec::is_empty));
    }
    if let Some(g) = &r.slide_grade {
        report["conclusionCode"] = json!([grade_concept(&g.grade)]);
    }
    if !media.is_empty() {
        report["media"] = Value::Array(media);
    }
    if let Some(s) = subject {
        report["subject"] = s;
    }
    if let Some(s) = specimen {
        report["specimen"] = s;
    }
    if let Some(b) = based_on {
        report["basedOn"] = b;
    }
    let mut forms = Vec::new();
    if let Some(u) = &r.viewer_uri {
        forms.push(json!({
            "contentType": "text/html",
            "url": u,
            "title": "result viewer: every image with its overlays, probabilities, triage and quality flags",
        }));
    }
    if let Some(u) = &r.result_uri {
        forms.push(json!({
            "contentType": "application/json",
            "url": u,
            "title": "cinflow.result/v2 record",
        }));
    }
    if !forms.is_empty() {
        report["presentedForm"] = Value::Array(forms);
    }
    report
}

/// The report of `r` as a FHIR transaction `Bundle`: the report, its
/// findings and media as entries, each `PUT` by a conditional update on its
/// identifier; the model `Device` and a `Provenance` (the model as author,
/// the scanned images as sources) created only if none exists. `link` turns
/// every `s3://` URI (images, overlays, the viewer, the record) into a URL
/// the LIS's users can open.
pub fn transaction(r: &ResultRecord, sys: &Systems, link: &dyn Fn(&str) -> String) -> Value {
    let mut report = diagnostic_report(r, sys);
    let report_id = report["identifier"][0].clone();
    let (id_system, id_value) = (
        report_id["system"].as_str().unwrap_or_default().to_string(),
        report_id["value"].as_str().unwrap_or_default().to_string(),
    );
    let full_url = |local: &str| format!("urn:uuid:{}", uuid_of(&format!("{id_value}/{local}")));
    let contained = match report.as_object_mut().and_then(|o| o.remove("contained")) {
        Some(Value::Array(c)) => c,
        _ => Vec::new(),
    };
    let mut entries = Vec::new();
    let mut sources = Vec::new();
    let mut findings = Vec::new();
    let mut device_url = None;
    for mut res in contained {
        let kind = res["resourceType"].as_str().unwrap_or_default().to_string();
        let local = res["id"].as_str().unwrap_or_default().to_string();
        if let Some(o) = res.as_object_mut() {
            o.remove("id");
        }
        let url = full_url(&local);
        let request = if kind == "Device" {
            let model = format!("{}:{}", r.model.name, r.model.version);
            let system = sys.system("cinflow-model");
            res["identifier"] = json!([identifier(system.clone(), &model)]);
            device_url = Some(url.clone());
            json!({ "method": "POST", "url": "Device", "ifNoneExist": format!("identifier={}", search_token(&system, &model)) })
        } else {
            let system = sys.system("cinflow-finding");
            let value = format!("{id_value}/{local}");
            res["identifier"] = json!([identifier(system.clone(), &value)]);
            json!({ "method": "PUT", "url": format!("{kind}?identifier={}", search_token(&system, &value)) })
        };
        if kind == "Observation" {
            findings.push(json!({ "reference": url }));
        }
        if local.starts_with("image-") {
            sources.push(json!({ "role": "source", "what": { "reference": url } }));
        }
        entries.push(json!({ "fullUrl": url, "resource": res, "request": request }));
    }
    let report_url = full_url("report");
    if let Some(o) = report.as_object_mut() {
        o.remove("id");
    }
    entries.push(json!({
        "fullUrl": report_url,
        "resource": report,
        "request": { "method": "PUT", "url": format!("DiagnosticReport?identifier={}", search_token(&id_system, &id_value)) },
    }));
    if let Some(device) = &device_url {
        let mut targets = vec![json!({ "reference": report_url })];
        targets.extend(findings);
        let mut provenance = json!({
            "resourceType": "Provenance",
            "meta": ai_meta(),
            "target": targets,
            "recorded": r.created_at,
            "activity": coded("http://terminology.hl7.org/CodeSystem/v3-DataOperation", "CREATE", "create"),
            "agent": [{
                "type": coded("http://terminology.hl7.org/CodeSystem/provenance-participant-type", "author", "Author"),
                "who": { "reference": device },
            }],
        });
        if !sources.is_empty() {
            provenance["entity"] = Value::Array(sources);
        }
        entries.push(json!({
            "fullUrl": full_url("provenance"),
            "resource": provenance,
            "request": {
                "method": "POST",
                "url": "Provenance",
                "ifNoneExist": format!("target:DiagnosticReport.identifier={}", search_token(&id_system, &id_value)),
            },
        }));
    }
    let mut bundle = json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries });
    rewrite(&mut bundle, &|local: &str| full_url(local), link);
    bundle
}

/// Local references (`#id`) to the entries' full URLs, and `s3://` URLs to links.
fn rewrite(v: &mut Value, full_url: &dyn Fn(&str) -> String, link: &dyn Fn(&str) -> String) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                let new = match (k.as_str(), x.as_str()) {
                    ("reference", Some(r)) if r.starts_with('#') => Some(full_url(&r[1..])),
                    ("url", Some(u)) if u.starts_with("s3://") => Some(link(u)),
                    _ => None,
                };
                match new {
                    Some(n) => *x = Value::String(n),
                    None => rewrite(x, full_url, link),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite(x, full_url, link)),
        _ => {}
    }
}

/// A token search value `system|value`, percent-encoded for a query string.
fn search_token(system: &str, value: &str) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    format!("{}|{}", enc(system), enc(value))
}

/// A name-based UUID (the version and variant bits of RFC 9562's version 8)
/// from the sha256 of `name`: the same resource gets the same full URL.
fn uuid_of(name: &str) -> String {
    let h = crate::hashing::sha256_hex(name.as_bytes());
    format!(
        "{}-{}-8{}-a{}-{}",
        &h[..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// A contained `Media` the model made (an overlay, the preprocessed image).
fn model_media(id: &str, modality: &str, url: &str, title: &str, note: &str) -> Value {
    json!({
        "resourceType": "Media",
        "id": id,
        "status": "completed",
        "type": coded("http://terminology.hl7.org/CodeSystem/media-type", "image", "Image"),
        "modality": { "text": modality },
        "content": { "contentType": content_type(url), "url": url, "title": title },
        "device": reference("model"),
        "note": [{ "text": note }],
    })
}

/// A probability (or a threshold on one) as a UCUM quantity of unit 1.
fn probability(v: f64) -> Value {
    json!({ "value": (v * 1e6).round() / 1e6, "unit": "probability", "system": UCUM, "code": "1" })
}

fn content_type(uri: &str) -> &'static str {
    let lower = uri.to_ascii_lowercase();
    if lower.ends_with(".png") {
        "image/png"
    } else if lower.ends_with(".tif") || lower.ends_with(".tiff") {
        "image/tiff"
    } else {
        "image/jpeg"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifier_systems_follow_the_base() {
        assert_eq!(
            Systems::new("urn:cinflow").system("patient-id"),
            "urn:cinflow:patient-id"
        );
        assert_eq!(
            Systems::new("https://lab.example.org/ids/").system("patient-id"),
            "https://lab.example.org/ids/patient-id"
        );
        assert_eq!(
            local_id(&["prob", "1", "Non neoplasm"]),
            "prob-1-Non-neoplasm"
        );
    }
}
