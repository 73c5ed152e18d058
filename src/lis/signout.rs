//! Signed-out diagnoses back into training.
//!
//! The LIS sends its final results for the slides cinflow graded as an
//! inbound HL7 v2 `ORU^R01` over MLLP (`--signout-mllp`), or as a FHIR R4
//! `DiagnosticReport` POSTed to `--signout-fhir` (the accession from an
//! `ACSN` identifier or `basedOn`, the diagnoses from `conclusionCode`, the
//! time from `issued`). The bridge then:
//! 1. Takes only final (`F`) and corrected (`C`) results (OBR-25). Others are
//!    acknowledged and ignored.
//! 2. Finds the order among those cinflow graded. When the bridge delivers a
//!    result it writes an order index
//!    `<signout-prefix>/orders/<accession>/<job>.json`, and the accession is
//!    looked up in OBR-3, OBR-2, ORC-3 and ORC-2, in that order (a pathology
//!    LIS is usually the filler and keeps the accession there). An order
//!    cinflow never graded is acknowledged (`AA`) and nothing is recorded.
//! 3. Maps the coded diagnoses (every CE/CWE/CNE `OBX` value, both triplets)
//!    to a grade ([`GradeMap`]: the SNOMED CT codes of
//!    [`crate::result::codes`], cinflow's own codes and `--signout-map`). When
//!    several map, the most severe grade wins, as a biopsy is graded by its
//!    worst lesion. When none maps, the answer is `AE` naming the codes. The
//!    bridge never guesses.
//! 4. Writes the case, `<signout-prefix>/cases/<accession>.json`: the grade,
//!    the diagnoses, the sign-out time, and one training row per graded image
//!    of the accession's slides. A corrected result replaces it.
//! 5. Updates the training manifest `<signout-prefix>/labels.csv` (`path,
//!    label, patient_id, slide_id, accession_id, signed_out_at, job_id`). It
//!    replaces the accession's rows and keeps the lab's own rows (those with
//!    no accession), so the same sign-out sent twice changes nothing. The
//!    nightly `enqueue-train --labels` names this manifest.
//!
//! Updates of the manifest are serialised within a bridge. At start the bridge
//! rebuilds the manifest from every case, which heals an update lost to two
//! bridges writing at once.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::model::ClassScheme;
use crate::observe::metrics;
use crate::result::codes::{grade_code, snomed_grade, CODE_SYSTEM, HL7_LOCAL, LOINC, SNOMED};
use crate::result::{ImageStatus, ResultRecord};
use crate::retry::RetryPolicy;
use crate::storage::{join_key, S3Client, StoreError};

use super::hl7::escape;

/// Schema tag of an order index object.
pub const ORDER_SCHEMA: &str = "cinflow.lis-order/v1";
/// Schema tag of a case object.
pub const CASE_SCHEMA: &str = "cinflow.signout/v1";
/// Columns of the training manifest.
pub const MANIFEST_COLUMNS: [&str; 7] = [
    "path",
    "label",
    "patient_id",
    "slide_id",
    "accession_id",
    "signed_out_at",
    "job_id",
];

/// One coded diagnosis as the LIS sent it (the system as given).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnosis {
    pub system: String,
    pub code: String,
    #[serde(default)]
    pub text: String,
}

impl std::fmt::Display for Diagnosis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.system, self.code)?;
        if !self.text.is_empty() {
            write!(f, " ({})", self.text)?;
        }
        Ok(())
    }
}

/// One code system under its several names (HL7 v2 `SCT`, FHIR URLs, ...).
fn normalize_system(s: &str) -> String {
    let t = s.trim();
    match t.to_ascii_uppercase().as_str() {
        "SCT" | "SNM" | "SNOMED" | "SNOMEDCT" | "SNOMED-CT" | "SNOMED CT" => SNOMED.into(),
        "LN" | "LOINC" => LOINC.into(),
        _ if t == SNOMED || t == LOINC || t == CODE_SYSTEM => t.into(),
        _ if t == HL7_LOCAL => CODE_SYSTEM.into(),
        _ => t.into(),
    }
}

/// Which signed-out diagnosis is which training grade.
#[derive(Debug, Clone, PartialEq)]
pub struct GradeMap {
    map: HashMap<(String, String), String>,
}

impl GradeMap {
    /// SNOMED CT's CIN codes and cinflow's own grade codes. HSIL (CIN2-3) is
    /// left out: it does not say which of the two grades.
    pub fn defaults() -> GradeMap {
        let mut map = HashMap::new();
        for grade in ClassScheme::Four.classes() {
            if let Some((code, _)) = snomed_grade(grade) {
                map.insert((SNOMED.to_string(), code.to_string()), grade.to_string());
            }
            map.insert(
                (CODE_SYSTEM.to_string(), grade_code(grade)),
                grade.to_string(),
            );
        }
        GradeMap { map }
    }

    /// The defaults plus the rows of a CSV `system,code,grade` (grades: CIN3,
    /// CIN2, CIN1, Non-neoplasm); a row for a known code replaces it.
    pub fn with_file(path: &Path) -> Result<GradeMap, String> {
        let mut m = GradeMap::defaults();
        let p = path.display();
        let mut r = csv::Reader::from_path(path).map_err(|e| format!("{p}: {e}"))?;
        let headers: Vec<String> = r
            .headers()
            .map_err(|e| format!("{p}: {e}"))?
            .iter()
            .map(|h| h.trim().to_string())
            .collect();
        if headers != ["system", "code", "grade"] {
            return Err(format!(
                "{p}: the header must be system,code,grade (found {})",
                headers.join(",")
            ));
        }
        for (i, rec) in r.records().enumerate() {
            let line = i + 2;
            let rec = rec.map_err(|e| format!("{p} line {line}: {e}"))?;
            let get = |c: usize| rec.get(c).map(str::trim).unwrap_or("");
            let grade = get(2);
            if !ClassScheme::Four.classes().contains(&grade) {
                return Err(format!(
                    "{p} line {line}: grade {grade:?} is not one of {}",
                    ClassScheme::Four.classes().join(", ")
                ));
            }
            if get(0).is_empty() || get(1).is_empty() {
                return Err(format!("{p} line {line}: system and code must be set"));
            }
            m.map.insert(
                (normalize_system(get(0)), get(1).to_string()),
                grade.to_string(),
            );
        }
        Ok(m)
    }

    pub fn grade(&self, d: &Diagnosis) -> Option<&str> {
        self.map
            .get(&(normalize_system(&d.system), d.code.trim().to_string()))
            .map(String::as_str)
    }

    /// The most severe grade any of `diagnoses` maps to.
    pub fn worst(&self, diagnoses: &[Diagnosis]) -> Option<String> {
        let classes = ClassScheme::Four.classes();
        diagnoses
            .iter()
            .filter_map(|d| self.grade(d))
            .min_by_key(|g| classes.iter().position(|c| c == g))
            .map(str::to_string)
    }
}

/// Result status of a sign-out (OBR-25).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignoutStatus {
    Final,
    Corrected,
}

/// A final result from the LIS.
#[derive(Debug, Clone, PartialEq)]
pub struct SignOut {
    /// Candidates for the accession, in the order they are looked up.
    pub order_numbers: Vec<String>,
    pub patient_id: Option<String>,
    /// None: not final (its OBR-25 given).
    pub status: Result<SignoutStatus, String>,
    /// RFC 3339.
    pub signed_out_at: String,
    pub diagnoses: Vec<Diagnosis>,
    /// `hl7 <control id>`.
    pub source: String,
}

/// An inbound message's header, for its ACK.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Header {
    pub control_id: String,
    pub sending_application: String,
    pub sending_facility: String,
    pub receiving_application: String,
    pub receiving_facility: String,
    pub processing_id: String,
}

/// HL7 unescaping of a value.
fn unescape(s: &str) -> String {
    s.replace("\\F\\", "|")
        .replace("\\S\\", "^")
        .replace("\\T\\", "&")
        .replace("\\R\\", "~")
        .replace("\\E\\", "\\")
}

/// An HL7 TS (`YYYYMMDD[HHMM[SS[.S+]]][+/-ZZZZ]`) as RFC 3339 (UTC without a zone).
pub fn hl7_time(ts: &str) -> Option<String> {
    let ts = ts.trim();
    let (body, zone) = match ts.find(['+', '-']) {
        Some(i) => (&ts[..i], Some(&ts[i..])),
        None => (ts, None),
    };
    let body = body.split('.').next().unwrap_or("");
    if body.len() < 8 || !body.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let mut digits = body.to_string();
    while digits.len() < 14 {
        digits.push('0');
    }
    let naive = chrono::NaiveDateTime::parse_from_str(&digits[..14], "%Y%m%d%H%M%S").ok()?;
    let offset = match zone {
        Some(z) if z.len() == 5 => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let h: i32 = z[1..3].parse().ok()?;
            let m: i32 = z[3..5].parse().ok()?;
            chrono::FixedOffset::east_opt(sign * (h * 3600 + m * 60))?
        }
        Some(_) => return None,
        None => chrono::FixedOffset::east_opt(0)?,
    };
    let t = naive.and_local_timezone(offset).single()?;
    Some(
        t.with_timezone(&chrono::Utc)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

/// Parses an inbound `ORU^R01`: its header (always, for the ACK) and the sign-out.
pub fn parse_oru(text: &str) -> (Header, Result<SignOut, String>) {
    let segs: Vec<Vec<&str>> = text
        .split(['\r', '\n'])
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.split('|').collect())
        .collect();
    let get = |name: &str, n: usize| -> Option<&str> {
        segs.iter()
            .find(|s| s[0] == name)
            .and_then(|s| s.get(n))
            .copied()
            .filter(|v| !v.is_empty())
    };
    // MSH-n sits at index n-1: MSH-1 is the separator itself.
    let msh = |n: usize| get("MSH", n - 1).map(unescape).unwrap_or_default();
    let header = Header {
        control_id: msh(10),
        sending_application: msh(3),
        sending_facility: msh(4),
        receiving_application: msh(5),
        receiving_facility: msh(6),
        processing_id: msh(11),
    };
    let parsed = (|| {
        if segs.first().map(|s| s[0]) != Some("MSH") {
            return Err("not an HL7 message (no MSH segment first)".to_string());
        }
        let kind = msh(9);
        if !kind.starts_with("ORU^R01") {
            return Err(format!("message type {kind:?}: only ORU^R01 is taken"));
        }
        if segs.iter().all(|s| s[0] != "OBR") {
            return Err("no OBR segment".into());
        }
        let first = |v: Option<&str>| v.map(|v| unescape(v.split('^').next().unwrap_or("")));
        let order_numbers: Vec<String> = [
            first(get("OBR", 3)),
            first(get("OBR", 2)),
            first(get("ORC", 3)),
            first(get("ORC", 2)),
        ]
        .into_iter()
        .flatten()
        .filter(|v| !v.is_empty())
        .collect();
        if order_numbers.is_empty() {
            return Err("no order number in OBR-2/3 or ORC-2/3".into());
        }
        let status = match get("OBR", 25).unwrap_or("") {
            "F" => Ok(SignoutStatus::Final),
            "C" => Ok(SignoutStatus::Corrected),
            other => Err(other.to_string()),
        };
        let signed_out_at = [get("OBR", 22), get("OBX", 14), get("MSH", 6)]
            .into_iter()
            .flatten()
            .find_map(hl7_time)
            .ok_or("no result time in OBR-22, OBX-14 or MSH-7")?;
        let mut diagnoses = Vec::new();
        for s in segs.iter().filter(|s| s[0] == "OBX") {
            if !matches!(s.get(2).copied(), Some("CE" | "CWE" | "CNE")) {
                continue;
            }
            for rep in s.get(5).copied().unwrap_or("").split('~') {
                let c: Vec<String> = rep.split('^').map(unescape).collect();
                for t in [0, 3] {
                    let code = c.get(t).cloned().unwrap_or_default();
                    let system = c.get(t + 2).cloned().unwrap_or_default();
                    if !code.is_empty() && !system.is_empty() {
                        diagnoses.push(Diagnosis {
                            system,
                            code,
                            text: c.get(t + 1).cloned().unwrap_or_default(),
                        });
                    }
                }
            }
        }
        Ok(SignOut {
            order_numbers,
            patient_id: first(get("PID", 3)).filter(|p| !p.is_empty()),
            status,
            signed_out_at,
            diagnoses,
            source: format!("hl7 {}", header.control_id),
        })
    })();
    (header, parsed)
}

/// Parses a FHIR R4 `DiagnosticReport` sent as a sign-out: the accession
/// from an identifier of type `ACSN` (or `basedOn` identifiers), the
/// diagnoses from `conclusionCode`, the time from `issued` (else
/// `effectiveDateTime`), the status `final` or `corrected`/`amended`.
pub fn parse_fhir_report(v: &serde_json::Value) -> Result<SignOut, String> {
    if v["resourceType"] != "DiagnosticReport" {
        return Err(format!(
            "resourceType is {}, expected DiagnosticReport",
            v["resourceType"]
        ));
    }
    let is_accession = |i: &serde_json::Value| {
        i["type"]["coding"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["code"] == "ACSN"))
    };
    let mut order_numbers: Vec<String> = Vec::new();
    let ids = v["identifier"].as_array().into_iter().flatten();
    let based = v["basedOn"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| &b["identifier"]);
    for i in ids.filter(|i| is_accession(i)).chain(based) {
        if let Some(value) = i["value"].as_str().filter(|s| !s.is_empty()) {
            order_numbers.push(value.to_string());
        }
    }
    if order_numbers.is_empty() {
        return Err(
            "no accession: an identifier of type ACSN or a basedOn identifier is needed".into(),
        );
    }
    let status = match v["status"].as_str().unwrap_or("") {
        "final" => Ok(SignoutStatus::Final),
        "corrected" | "amended" => Ok(SignoutStatus::Corrected),
        other => Err(other.to_string()),
    };
    let signed_out_at = ["issued", "effectiveDateTime"]
        .iter()
        .filter_map(|k| v[*k].as_str())
        .find_map(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| {
            t.with_timezone(&chrono::Utc)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        })
        .ok_or("no sign-out time in issued or effectiveDateTime")?;
    let diagnoses = v["conclusionCode"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["coding"].as_array().into_iter().flatten())
        .filter_map(|c| {
            Some(Diagnosis {
                system: c["system"].as_str()?.to_string(),
                code: c["code"].as_str()?.to_string(),
                text: c["display"].as_str().unwrap_or_default().to_string(),
            })
        })
        .collect();
    Ok(SignOut {
        order_numbers,
        patient_id: v["subject"]["identifier"]["value"]
            .as_str()
            .map(str::to_string),
        status,
        signed_out_at,
        diagnoses,
        source: format!(
            "fhir DiagnosticReport {}",
            v["id"].as_str().unwrap_or("(no id)")
        ),
    })
}

/// An order cinflow graded, as the bridge found it in a delivered result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderRef {
    pub schema: String,
    pub accession_id: String,
    pub job_id: String,
    #[serde(default)]
    pub slide_id: Option<String>,
    #[serde(default)]
    pub patient_id: Option<String>,
    pub result_uri: String,
}

/// One training row of a case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseRow {
    pub path: String,
    pub label: String,
    pub patient_id: String,
    pub slide_id: String,
    pub accession_id: String,
    pub signed_out_at: String,
    pub job_id: String,
}

/// A signed-out case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseRecord {
    pub schema: String,
    pub accession_id: String,
    pub grade: String,
    pub status: SignoutStatus,
    pub signed_out_at: String,
    pub diagnoses: Vec<Diagnosis>,
    pub source: String,
    pub received_at: String,
    pub rows: Vec<CaseRow>,
}

/// What became of a sign-out.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The case and the manifest rows written.
    Recorded {
        accession_id: String,
        grade: String,
        images: usize,
    },
    /// Not a final result (OBR-25 given): nothing recorded.
    NotFinal(String),
    /// No order cinflow graded: nothing recorded.
    NotGraded(Vec<String>),
    /// No diagnosis maps to a grade: nothing recorded, reported.
    UnknownDiagnosis(Vec<Diagnosis>),
    /// The message cannot be read.
    Invalid(String),
}

impl Outcome {
    /// The `outcome` label of `cinflow_lis_signouts_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Recorded { .. } => "recorded",
            Outcome::NotFinal(_) => "not_final",
            Outcome::NotGraded(_) => "not_graded",
            Outcome::UnknownDiagnosis(_) => "unknown_diagnosis",
            Outcome::Invalid(_) => "invalid",
        }
    }

    /// The ACK code and text.
    pub fn ack(&self) -> (&'static str, String) {
        match self {
            Outcome::Recorded {
                accession_id,
                grade,
                images,
            } => (
                "AA",
                format!(
                    "recorded accession {accession_id} as {grade} for training ({images} images)"
                ),
            ),
            Outcome::NotFinal(s) => (
                "AA",
                format!("result status {s:?} is not final (F) or corrected (C): nothing recorded"),
            ),
            Outcome::NotGraded(ids) => (
                "AA",
                format!(
                    "no slide of order {} was graded by cinflow: nothing recorded",
                    ids.join(" / ")
                ),
            ),
            Outcome::UnknownDiagnosis(d) => (
                "AE",
                if d.is_empty() {
                    "no coded diagnosis (CE/CWE OBX): nothing recorded".to_string()
                } else {
                    format!(
                        "no training grade for the diagnoses {}: nothing recorded; map them in --signout-map",
                        d.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
                    )
                },
            ),
            Outcome::Invalid(why) => ("AR", why.clone()),
        }
    }
}

/// Sign-outs in S3: order index, cases and the training manifest.
pub struct SignoutStore {
    pub s3: S3Client,
    pub bucket: String,
    pub prefix: String,
    pub map: GradeMap,
    pub retry: RetryPolicy,
    /// Serialises the manifest's read-modify-write within this process.
    manifest: Mutex<()>,
}

/// An accession id as one key segment: ids that are not are refused.
fn segment(id: &str) -> Result<&str, String> {
    crate::queue::messages::check_id("accession", id)
        .map(|()| id)
        .map_err(|e| e.to_string())
}

impl SignoutStore {
    pub fn new(
        s3: S3Client,
        bucket: &str,
        prefix: &str,
        map: GradeMap,
        retry: RetryPolicy,
    ) -> SignoutStore {
        SignoutStore {
            s3,
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            map,
            retry,
            manifest: Mutex::new(()),
        }
    }

    fn order_prefix(&self, accession: &str) -> String {
        format!("{}/", join_key(&[&self.prefix, "orders", accession]))
    }

    fn case_key(&self, accession: &str) -> String {
        join_key(&[&self.prefix, "cases", &format!("{accession}.json")])
    }

    /// The training manifest's key.
    pub fn manifest_key(&self) -> String {
        join_key(&[&self.prefix, "labels.csv"])
    }

    pub fn manifest_uri(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.manifest_key())
    }

    /// Records that cinflow graded `r`'s order (results with an accession id
    /// and a stored record); the sign-out finds the slides through it.
    pub async fn record_order(&self, r: &ResultRecord) -> Result<(), StoreError> {
        let (Some(acc), Some(job), Some(uri)) = (&r.ids.accession_id, &r.job_id, &r.result_uri)
        else {
            return Ok(());
        };
        let Ok(acc) = segment(acc) else {
            tracing::warn!(accession = %acc, "accession id cannot name an object: no sign-out can be matched to it");
            return Ok(());
        };
        let order = OrderRef {
            schema: ORDER_SCHEMA.into(),
            accession_id: acc.to_string(),
            job_id: job.clone(),
            slide_id: r.slide_id.clone(),
            patient_id: r.ids.patient_id.clone(),
            result_uri: uri.clone(),
        };
        let key = format!("{}{job}.json", self.order_prefix(acc));
        let json = serde_json::to_vec_pretty(&order).expect("order serialises");
        self.retry
            .run("record an order", || {
                self.s3
                    .put(&self.bucket, &key, json.clone().into(), "application/json")
            })
            .await
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let got = self
            .retry
            .run("read a sign-out object", || {
                self.s3.get(bucket, key, 64 << 20)
            })
            .await;
        match got {
            Ok(b) => Ok(serde_json::from_slice(&b).ok()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The orders of the first order number cinflow graded: (accession, orders).
    async fn orders(
        &self,
        numbers: &[String],
    ) -> Result<Option<(String, Vec<OrderRef>)>, StoreError> {
        for n in numbers {
            let Ok(acc) = segment(n) else { continue };
            let prefix = self.order_prefix(acc);
            let keys = self
                .retry
                .run("list orders", || self.s3.list(&self.bucket, &prefix))
                .await?;
            let mut orders = Vec::new();
            for k in keys {
                if let Some(o) = self.get_json::<OrderRef>(&self.bucket, &k).await? {
                    orders.push(o);
                }
            }
            if !orders.is_empty() {
                return Ok(Some((acc.to_string(), orders)));
            }
        }
        Ok(None)
    }

    /// Takes one sign-out: the case and the manifest, or why not.
    pub async fn receive(&self, s: &SignOut) -> Result<Outcome, StoreError> {
        let status = match &s.status {
            Ok(st) => *st,
            Err(other) => return Ok(Outcome::NotFinal(other.clone())),
        };
        let Some((accession, orders)) = self.orders(&s.order_numbers).await? else {
            return Ok(Outcome::NotGraded(s.order_numbers.clone()));
        };
        let Some(grade) = self.map.worst(&s.diagnoses) else {
            return Ok(Outcome::UnknownDiagnosis(s.diagnoses.clone()));
        };
        let mut rows = Vec::new();
        for o in &orders {
            let Some((bucket, key)) = crate::worker::stores::split_s3_uri(&o.result_uri) else {
                continue;
            };
            let Some(r) = self.get_json::<ResultRecord>(bucket, key).await? else {
                continue;
            };
            let patient = r
                .ids
                .patient_id
                .clone()
                .or_else(|| s.patient_id.clone())
                .unwrap_or_else(|| accession.clone());
            for img in r.images.iter().filter(|i| i.status == ImageStatus::Ok) {
                rows.push(CaseRow {
                    path: img.uri.clone(),
                    label: grade.clone(),
                    patient_id: patient.clone(),
                    slide_id: r.slide_id.clone().unwrap_or_else(|| o.job_id.clone()),
                    accession_id: accession.clone(),
                    signed_out_at: s.signed_out_at.clone(),
                    job_id: o.job_id.clone(),
                });
            }
        }
        rows.sort_by(|a, b| (&a.job_id, &a.path).cmp(&(&b.job_id, &b.path)));
        let case = CaseRecord {
            schema: CASE_SCHEMA.into(),
            accession_id: accession.clone(),
            grade: grade.clone(),
            status,
            signed_out_at: s.signed_out_at.clone(),
            diagnoses: s.diagnoses.clone(),
            source: s.source.clone(),
            received_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            rows,
        };
        let key = self.case_key(&accession);
        let json = serde_json::to_vec_pretty(&case).expect("case serialises");
        self.retry
            .run("write a case", || {
                self.s3
                    .put(&self.bucket, &key, json.clone().into(), "application/json")
            })
            .await?;
        self.update_manifest(Some(&case)).await?;
        Ok(Outcome::Recorded {
            accession_id: accession,
            grade,
            images: case.rows.len(),
        })
    }

    /// Rewrites the manifest: the lab's own rows kept, then the rows of
    /// `case` replacing its accession's (or, with None, the rows of every
    /// stored case replacing all signed-out rows).
    pub async fn update_manifest(&self, case: Option<&CaseRecord>) -> Result<usize, StoreError> {
        let _one = self.manifest.lock().await;
        let key = self.manifest_key();
        let current = match self
            .retry
            .run("read the training manifest", || {
                self.s3.get(&self.bucket, &key, 1 << 30)
            })
            .await
        {
            Ok(b) => b,
            Err(e) if e.is_not_found() => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut by_accession: BTreeMap<String, Vec<CaseRow>> = BTreeMap::new();
        let mut own: Vec<Vec<String>> = Vec::new();
        for row in read_manifest(&current) {
            match row {
                ManifestRow::Own(r) => own.push(r),
                ManifestRow::Case(r) => by_accession
                    .entry(r.accession_id.clone())
                    .or_default()
                    .push(r),
            }
        }
        match case {
            Some(c) => {
                by_accession.insert(c.accession_id.clone(), c.rows.clone());
            }
            None => {
                by_accession.clear();
                let prefix = format!("{}/", join_key(&[&self.prefix, "cases"]));
                let keys = self
                    .retry
                    .run("list cases", || self.s3.list(&self.bucket, &prefix))
                    .await?;
                for k in keys {
                    if let Some(c) = self.get_json::<CaseRecord>(&self.bucket, &k).await? {
                        by_accession.insert(c.accession_id.clone(), c.rows);
                    }
                }
            }
        }
        let mut w = csv::Writer::from_writer(Vec::new());
        let io = |e: csv::Error| StoreError::Backend {
            uri: self.manifest_uri(),
            detail: format!("writing CSV: {e}"),
        };
        w.write_record(MANIFEST_COLUMNS).map_err(io)?;
        let mut n = 0;
        for r in &own {
            w.write_record(r).map_err(io)?;
            n += 1;
        }
        for r in by_accession.values().flatten() {
            w.write_record([
                &r.path,
                &r.label,
                &r.patient_id,
                &r.slide_id,
                &r.accession_id,
                &r.signed_out_at,
                &r.job_id,
            ])
            .map_err(io)?;
            n += 1;
        }
        let bytes = w.into_inner().map_err(|e| StoreError::Backend {
            uri: self.manifest_uri(),
            detail: e.to_string(),
        })?;
        self.retry
            .run("write the training manifest", || {
                self.s3
                    .put(&self.bucket, &key, bytes.clone().into(), "text/csv")
            })
            .await?;
        Ok(n)
    }
}

enum ManifestRow {
    /// The lab's own row, in the manifest's columns.
    Own(Vec<String>),
    Case(CaseRow),
}

/// The rows of a manifest in any column order (unreadable rows are dropped:
/// the file is the bridge's own).
fn read_manifest(bytes: &[u8]) -> Vec<ManifestRow> {
    let mut r = csv::Reader::from_reader(bytes);
    let Ok(headers) = r.headers().cloned() else {
        return Vec::new();
    };
    let col = |name: &str| headers.iter().position(|h| h.trim() == name);
    let cols: Vec<Option<usize>> = MANIFEST_COLUMNS.iter().map(|c| col(c)).collect();
    r.records()
        .flatten()
        .map(|rec| {
            let v: Vec<String> = cols
                .iter()
                .map(|c| c.and_then(|c| rec.get(c)).unwrap_or("").trim().to_string())
                .collect();
            if v[4].is_empty() {
                ManifestRow::Own(v)
            } else {
                ManifestRow::Case(CaseRow {
                    path: v[0].clone(),
                    label: v[1].clone(),
                    patient_id: v[2].clone(),
                    slide_id: v[3].clone(),
                    accession_id: v[4].clone(),
                    signed_out_at: v[5].clone(),
                    job_id: v[6].clone(),
                })
            }
        })
        .collect()
}

/// The ACK of an inbound message.
pub fn ack(h: &Header, code: &str, text: &str) -> String {
    let now = chrono::Utc::now().format("%Y%m%d%H%M%S+0000");
    let id: String =
        crate::hashing::sha256_hex(format!("{}{now}", h.control_id).as_bytes())[..20].to_string();
    let mut msh = format!(
        "MSH|^~\\&|{}|{}|{}|{}|{now}||ACK^R01^ACK|{id}|{}|2.5.1",
        escape(&h.receiving_application),
        escape(&h.receiving_facility),
        escape(&h.sending_application),
        escape(&h.sending_facility),
        if h.processing_id.is_empty() {
            "P"
        } else {
            &h.processing_id
        },
    );
    msh.push_str(&format!(
        "\rMSA|{code}|{}|{}",
        escape(&h.control_id),
        escape(text)
    ));
    msh
}

/// Takes a parsed sign-out (or why it could not be read), counts and logs
/// what became of it.
async fn take(
    store: &SignoutStore,
    parsed: Result<SignOut, String>,
) -> Result<Outcome, StoreError> {
    let source = parsed
        .as_ref()
        .map(|s| s.source.clone())
        .unwrap_or_default();
    let outcome = match parsed {
        Err(why) => Ok(Outcome::Invalid(why)),
        Ok(s) => store.receive(&s).await,
    };
    match &outcome {
        Ok(o) => {
            metrics().lis_signout(o.label());
            tracing::info!(source = %source, outcome = o.label(), "{}", o.ack().1);
        }
        Err(e) => {
            metrics().lis_signout("failed");
            tracing::warn!(source = %source, error = %e, "sign-out not recorded");
        }
    }
    outcome
}

/// Handles one inbound HL7 message: the ACK to send.
pub async fn handle(store: &SignoutStore, text: &str) -> String {
    let (header, parsed) = parse_oru(text);
    match take(store, parsed).await {
        Ok(o) => {
            let (code, why) = o.ack();
            ack(&header, code, &why)
        }
        Err(e) => ack(
            &header,
            "AE",
            &format!("not recorded, send it again later: {e}"),
        ),
    }
}

/// Handles one FHIR sign-out (a DiagnosticReport's JSON): HTTP status and
/// OperationOutcome. 201 recorded; 200 nothing to record (not final, not
/// graded by cinflow); 422 no diagnosis maps to a grade; 400 unreadable;
/// 503 storage unavailable (send it again).
pub async fn handle_fhir(store: &SignoutStore, body: &[u8]) -> (u16, serde_json::Value) {
    let parsed = serde_json::from_slice::<serde_json::Value>(body)
        .map_err(|e| format!("not JSON: {e}"))
        .and_then(|v| parse_fhir_report(&v));
    let (status, severity, code, text) = match take(store, parsed).await {
        Ok(o) => {
            let text = o.ack().1;
            match o {
                Outcome::Recorded { .. } => (201, "information", "informational", text),
                Outcome::NotFinal(_) | Outcome::NotGraded(_) => {
                    (200, "information", "informational", text)
                }
                Outcome::UnknownDiagnosis(_) => (422, "error", "code-invalid", text),
                Outcome::Invalid(_) => (400, "error", "invalid", text),
            }
        }
        Err(e) => (
            503,
            "error",
            "transient",
            format!("not recorded, send it again later: {e}"),
        ),
    };
    (status, operation_outcome(severity, code, &text))
}

/// A FHIR OperationOutcome with one issue.
fn operation_outcome(severity: &str, code: &str, diagnostics: &str) -> serde_json::Value {
    serde_json::json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": severity, "code": code, "diagnostics": diagnostics }],
    })
}

/// Serves `POST .../DiagnosticReport` on `addr` until the process ends (FHIR
/// sign-outs); returns the bound address.
pub async fn serve_fhir(addr: &str, store: Arc<SignoutStore>) -> anyhow::Result<SocketAddr> {
    let local = crate::listen::serve(
        addr,
        "--signout-fhir",
        "FHIR sign-outs",
        move |stream, _| {
            let store = store.clone();
            async move {
                let svc = hyper::service::service_fn(move |req| fhir_request(store.clone(), req));
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await
                {
                    tracing::debug!(error = %e, "FHIR sign-out connection ended");
                }
            }
        },
    )
    .await?;
    tracing::info!(addr = %local, "taking sign-outs (FHIR DiagnosticReport)");
    Ok(local)
}

/// One request to the FHIR sign-out endpoint: `POST .../DiagnosticReport`.
async fn fhir_request(
    store: Arc<SignoutStore>,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<http_body_util::Full<hyper::body::Bytes>>, std::convert::Infallible> {
    use http_body_util::{BodyExt, Full, Limited};
    let (status, body) = if req.method() != hyper::Method::POST
        || !req.uri().path().ends_with("/DiagnosticReport")
    {
        (
            405,
            operation_outcome(
                "error",
                "not-supported",
                "sign-outs are POSTed to .../DiagnosticReport",
            ),
        )
    } else {
        match Limited::new(req.into_body(), MAX_MESSAGE_BYTES)
            .collect()
            .await
        {
            Ok(b) => handle_fhir(&store, &b.to_bytes()).await,
            Err(e) => (
                413,
                operation_outcome("error", "too-long", &format!("body not read: {e}")),
            ),
        }
    };
    Ok(hyper::Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/fhir+json")
        .body(Full::new(body.to_string().into()))
        .expect("a valid response"))
}

/// Listens for MLLP connections on `addr` until the process ends; each
/// message is answered with its ACK. Returns the bound address.
pub async fn serve_mllp(addr: &str, store: Arc<SignoutStore>) -> anyhow::Result<SocketAddr> {
    let local = crate::listen::serve(
        addr,
        "--signout-mllp",
        "MLLP sign-outs",
        move |stream, peer| {
            let store = store.clone();
            async move {
                if let Err(e) = connection(stream, &store).await {
                    tracing::debug!(peer = %peer, error = %e, "sign-out connection ended");
                }
            }
        },
    )
    .await?;
    tracing::info!(addr = %local, "taking sign-outs (HL7 v2 ORU^R01 over MLLP)");
    Ok(local)
}

/// Largest inbound message.
const MAX_MESSAGE_BYTES: usize = 4 << 20;

async fn connection(mut stream: TcpStream, store: &SignoutStore) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = buf.windows(2).position(|w| w == [0x1C, 0x0D]) {
            let start = buf[..end]
                .iter()
                .position(|&b| b == 0x0B)
                .map_or(0, |s| s + 1);
            let text = String::from_utf8_lossy(&buf[start..end]).into_owned();
            buf.drain(..end + 2);
            let answer = handle(store, &text).await;
            let mut frame = vec![0x0B];
            frame.extend_from_slice(answer.as_bytes());
            frame.extend_from_slice(&[0x1C, 0x0D]);
            stream.write_all(&frame).await?;
        }
        if buf.len() > MAX_MESSAGE_BYTES {
            return Err(std::io::Error::other(
                "message over 4 MiB: connection closed",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FINAL: &str = "MSH|^~\\&|LIS|PATH|CINFLOW|LAB|20261201093000+0100||ORU^R01^ORU_R01|LIS77|P|2.5.1\r\
PID|1||PAT-1^^^HOSP^MR\r\
ORC|RE|ORD-9|S26-0042\r\
OBR|1|ORD-9|S26-0042^LIS|65753-6^Cervix Pathology biopsy report^LN|||20261130|||||||||||||||20261201091500+0100|||F\r\
OBX|1|CWE|22637-3^Final diagnosis^LN||285838002^CIN 2^SCT^D2^dysplasia II^L||||||F\r\
OBX|2|CWE|X^Adequacy^L||ADQ^Adequate^L||||||F\r\
OBX|3|TX|22637-3^Final diagnosis^LN||Cervix, biopsy: CIN 2||||||F";

    #[test]
    fn a_final_oru_is_read_with_its_order_numbers_time_and_codes() {
        let (h, s) = parse_oru(FINAL);
        assert_eq!(h.control_id, "LIS77");
        assert_eq!(
            (
                h.sending_application.as_str(),
                h.receiving_facility.as_str()
            ),
            ("LIS", "LAB")
        );
        let s = s.unwrap();
        assert_eq!(s.order_numbers, ["S26-0042", "ORD-9", "S26-0042", "ORD-9"]);
        assert_eq!(s.status, Ok(SignoutStatus::Final));
        assert_eq!(s.signed_out_at, "2026-12-01T08:15:00Z");
        assert_eq!(s.patient_id.as_deref(), Some("PAT-1"));
        assert_eq!(s.diagnoses.len(), 3);
        let m = GradeMap::defaults();
        assert_eq!(m.worst(&s.diagnoses).as_deref(), Some("CIN2"));

        let prelim = FINAL.replace("|||F\rOBX|1", "|||P\rOBX|1");
        assert_eq!(parse_oru(&prelim).1.unwrap().status, Err("P".into()));
        let (_, bad) = parse_oru("MSH|^~\\&|LIS||X||20261201||ADT^A01|1|P|2.5.1");
        assert!(bad.unwrap_err().contains("only ORU^R01"));
    }

    #[test]
    fn the_worst_mapped_grade_wins_and_unknown_codes_map_to_nothing() {
        let d = |system: &str, code: &str| Diagnosis {
            system: system.into(),
            code: code.into(),
            text: String::new(),
        };
        let m = GradeMap::defaults();
        assert_eq!(
            m.worst(&[
                d("SCT", "285836003"),
                d("http://snomed.info/sct", "20365006")
            ])
            .as_deref(),
            Some("CIN3")
        );
        assert_eq!(
            m.worst(&[d("99CIN", "grade-Non-neoplasm")]).as_deref(),
            Some("Non-neoplasm")
        );
        assert_eq!(
            m.worst(&[d("SCT", "22725004")]),
            None,
            "HSIL is not one grade"
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("map.csv");
        std::fs::write(
            &f,
            "system,code,grade\nL,NEG,Non-neoplasm\nSCT,22725004,CIN3\n",
        )
        .unwrap();
        let m = GradeMap::with_file(&f).unwrap();
        assert_eq!(m.worst(&[d("L", "NEG")]).as_deref(), Some("Non-neoplasm"));
        assert_eq!(m.worst(&[d("SCT", "22725004")]).as_deref(), Some("CIN3"));
        std::fs::write(&f, "system,code,grade\nL,NEG,normal\n").unwrap();
        assert!(GradeMap::with_file(&f)
            .unwrap_err()
            .contains("line 2: grade \"normal\""));
    }

    #[test]
    fn hl7_times_become_utc() {
        assert_eq!(
            hl7_time("20261201").as_deref(),
            Some("2026-12-01T00:00:00Z")
        );
        assert_eq!(
            hl7_time("202612010930-0500").as_deref(),
            Some("2026-12-01T14:30:00Z")
        );
        assert_eq!(hl7_time("2026").as_deref(), None);
    }

    #[test]
    fn acks_answer_the_sender() {
        let (h, _) = parse_oru(FINAL);
        let a = ack(&h, "AE", "no grade for X|Y");
        let ack = crate::lis::hl7::parse_ack(&a).unwrap();
        assert_eq!(
            (ack.code.as_str(), ack.control_id.as_str()),
            ("AE", "LIS77")
        );
        assert!(a.starts_with("MSH|^~\\&|CINFLOW|LAB|LIS|PATH|"));
        assert!(a.contains("no grade for X\\F\\Y"));
    }

    #[test]
    fn a_fhir_sign_out_is_read_from_its_identifiers_and_conclusion_codes() {
        let v = serde_json::json!({
            "resourceType": "DiagnosticReport", "id": "r1", "status": "amended",
            "identifier": [
                {"system": "urn:lab", "value": "X-1"},
                {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}, "value": "S26-0050"}
            ],
            "subject": {"identifier": {"value": "PAT-7"}},
            "issued": "2026-12-02T10:00:00+01:00",
            "conclusionCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "285836003", "display": "CIN 1"}]}]
        });
        let s = parse_fhir_report(&v).unwrap();
        assert_eq!(s.order_numbers, ["S26-0050"]);
        assert_eq!(s.status, Ok(SignoutStatus::Corrected));
        assert_eq!(s.signed_out_at, "2026-12-02T09:00:00Z");
        assert_eq!(
            GradeMap::defaults().worst(&s.diagnoses).as_deref(),
            Some("CIN1")
        );
        let mut no_acc = v.clone();
        no_acc["identifier"] = serde_json::json!([]);
        assert!(parse_fhir_report(&no_acc)
            .unwrap_err()
            .contains("no accession"));
    }
}
