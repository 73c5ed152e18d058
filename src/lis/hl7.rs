//! HL7 v2.5.1 `ORU^R01` of a result, and the LIS's `ACK`.
//!
//! One message per result (docs/lis.md, "HL7 v2"):
//! - `MSH`: the configured applications and facilities, the result's time,
//!   a message control id derived from the result (the same result always
//!   gives the same id, so a receiver can recognise a repeat);
//! - `PID` (patient id as `MR`, with the configured assigning authority) and
//!   `PV1` (class `N`) when the job named a patient; an accession alone is
//!   matched through the order;
//! - `ORC`/`OBR`: placer order number = the accession, filler order number =
//!   the job id, LOINC 65753-6 (Cervix Pathology biopsy report), result status
//!   `P` (preliminary), `X` when nothing could be graded;
//! - `NTE`: that this is a computer-assisted preliminary grade for decision
//!   support, the slide's conclusion and triage reason, any errors;
//! - `OBX` (status `P`): the slide grade (CE: SNOMED CT and cinflow's code),
//!   the CIN2+ triage and P(CIN2+); per image (sub-id = image number) its
//!   grade, every class's probability (NM, UCUM `1`) and links to its
//!   overlay and preprocessed image; then links to the viewer page and the
//!   result record. Links are `TX` values holding the URL: a presigned URL
//!   is longer than the 199 characters of an `RP` pointer;
//! - `SPM` with the specimen id, when known.

use crate::result::codes::{
    grade_code, snomed_grade, HL7_LOCAL, LOINC_CERVIX_BIOPSY, LOINC_PATHOLOGY_STUDY,
};
use crate::result::{ImageStatus, ResultRecord};

/// The HL7 v2 version this bridge speaks.
pub const VERSION: &str = "2.5.1";

/// The header fields a lab configures.
#[derive(Debug, Clone, PartialEq)]
pub struct Hl7Config {
    pub sending_application: String,
    pub sending_facility: String,
    pub receiving_application: String,
    pub receiving_facility: String,
    /// `P` (production), `T` (training) or `D` (debugging).
    pub processing_id: String,
    /// Assigning authority of patient ids (PID-3.4); empty: none.
    pub patient_authority: String,
}

/// A built message.
#[derive(Debug, Clone, PartialEq)]
pub struct Oru {
    /// MSH-10.
    pub control_id: String,
    /// Segments separated by carriage returns.
    pub text: String,
}

/// Escapes text for a field, component or subcomponent (`|^~\&` and line breaks).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\E\\"),
            '|' => out.push_str("\\F\\"),
            '^' => out.push_str("\\S\\"),
            '&' => out.push_str("\\T\\"),
            '~' => out.push_str("\\R\\"),
            '\r' | '\n' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A segment from its fields by position (1-based; gaps stay empty). Values
/// are written as given: escape text before.
fn segment(name: &str, fields: &[(usize, String)]) -> String {
    let last = fields.iter().map(|(i, _)| *i).max().unwrap_or(0);
    let mut out = vec![String::new(); last + 1];
    out[0] = name.to_string();
    for (i, v) in fields {
        out[*i] = v.clone();
    }
    out.join("|")
}

/// HL7 TS of an RFC 3339 time (UTC), `YYYYMMDDHHMMSS+0000`.
fn timestamp(rfc3339: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_else(|_| chrono::Utc::now())
        .format("%Y%m%d%H%M%S+0000")
        .to_string()
}

/// CE of a grade: SNOMED CT first where one means it, cinflow's code as the
/// alternate (or only) triplet.
fn grade_cwe(class: &str) -> String {
    let local = format!(
        "{}^{}^{HL7_LOCAL}",
        escape(&grade_code(class)),
        escape(class)
    );
    match snomed_grade(class) {
        Some((code, display)) => format!("{code}^{}^SCT^{local}", escape(display)),
        None => local,
    }
}

fn local_ce(code: &str, text: &str) -> String {
    format!("{}^{}^{HL7_LOCAL}", escape(code), escape(text))
}

/// The message control id of a result: the same result, the same id.
pub fn control_id(r: &ResultRecord) -> String {
    let text = format!(
        "cinflow.oru/v1\n{}\n{}\n{}\n{}",
        r.job_id.as_deref().unwrap_or_default(),
        r.model.name,
        r.model.version,
        r.created_at
    );
    crate::hashing::sha256_hex(text.as_bytes())[..20].to_string()
}

/// The `ORU^R01` of `r`; `link` turns `s3://` URIs into URLs to open.
pub fn oru_r01(r: &ResultRecord, cfg: &Hl7Config, link: &dyn Fn(&str) -> String) -> Oru {
    let ts = timestamp(&r.created_at);
    let control_id = control_id(r);
    let job = r.job_id.as_deref().unwrap_or("unidentified");
    let mut segs = Vec::new();
    segs.push(format!(
        "MSH|^~\\&|{}|{}|{}|{}|{ts}||ORU^R01^ORU_R01|{control_id}|{}|{VERSION}",
        escape(&cfg.sending_application),
        escape(&cfg.sending_facility),
        escape(&cfg.receiving_application),
        escape(&cfg.receiving_facility),
        escape(&cfg.processing_id),
    ));
    if let Some(p) = &r.ids.patient_id {
        segs.push(segment(
            "PID",
            &[
                (1, "1".into()),
                (
                    3,
                    format!("{}^^^{}^MR", escape(p), escape(&cfg.patient_authority)),
                ),
                // Required; cinflow knows no names: the name type alone (U, unspecified).
                (5, "^^^^^^U".into()),
            ],
        ));
        segs.push(segment("PV1", &[(1, "1".into()), (2, "N".into())]));
    }
    let placer = r
        .ids
        .accession_id
        .as_deref()
        .map(escape)
        .unwrap_or_default();
    let filler = format!("{}^{}", escape(job), escape(&cfg.sending_application));
    segs.push(segment(
        "ORC",
        &[(1, "RE".into()), (2, placer.clone()), (3, filler.clone())],
    ));
    let graded = r
        .images
        .iter()
        .filter(|i| i.status == ImageStatus::Ok)
        .count();
    let status = if graded == 0 { "X" } else { "P" };
    segs.push(segment(
        "OBR",
        &[
            (1, "1".into()),
            (2, placer),
            (3, filler),
            (
                4,
                format!(
                    "{}^{}^LN^{}^{}^LN",
                    LOINC_CERVIX_BIOPSY.0,
                    escape(LOINC_CERVIX_BIOPSY.1),
                    LOINC_PATHOLOGY_STUDY.0,
                    escape(LOINC_PATHOLOGY_STUDY.1)
                ),
            ),
            (7, ts.clone()),
            (22, ts.clone()),
            (24, "SP".into()),
            (25, status.into()),
        ],
    ));
    for (n, note) in notes(r).iter().enumerate() {
        segs.push(segment(
            "NTE",
            &[(1, (n + 1).to_string()), (2, "L".into()), (3, escape(note))],
        ));
    }

    let method = local_ce("computer-assisted", "Computer-assisted grading (AI)");
    let equipment = format!(
        "{}^{}",
        escape(&format!("{}:{}", r.model.name, r.model.version)),
        escape(&cfg.sending_application)
    );
    let mut obx = Vec::new();
    let mut add = |kind: &str, id: String, sub: String, value: String, units: &str| {
        obx.push((kind.to_string(), id, sub, value, units.to_string()));
    };
    if let Some(g) = &r.slide_grade {
        add(
            "CE",
            local_ce("slide-grade", "Slide grade (computer-assisted)"),
            String::new(),
            grade_cwe(&g.grade),
            "",
        );
        if let Some(t) = g.triage {
            add(
                "CE",
                local_ce("cin2plus-triage", "CIN2+ triage of the slide"),
                String::new(),
                local_ce(t.code(), t.as_str()),
                "",
            );
        }
        if let Some(p) = g.p_cin2_plus {
            add(
                "NM",
                local_ce("p-cin2plus", "Probability of CIN2+ (slide)"),
                String::new(),
                number(f64::from(p)),
                "1^^UCUM",
            );
        }
    }
    for (n, img) in r.images.iter().enumerate() {
        let sub = (n + 1).to_string();
        if let Some(pred) = &img.predicted_class {
            add(
                "CE",
                local_ce("image-grade", "Image grade (computer-assisted)"),
                sub.clone(),
                grade_cwe(pred),
                "",
            );
        }
        if let Some(probs) = &img.probabilities {
            for class in &r.model.classes {
                if let Some(p) = probs.get(class) {
                    add(
                        "NM",
                        local_ce(
                            &format!("probability-{class}"),
                            &format!("Probability of {class}"),
                        ),
                        sub.clone(),
                        number(f64::from(*p)),
                        "1^^UCUM",
                    );
                }
            }
        }
        for h in &img.heatmaps {
            add(
                "TX",
                local_ce(
                    &format!("heatmap-{}", h.class),
                    &format!("Heatmap of {}", h.class),
                ),
                sub.clone(),
                escape(&link(&h.overlay)),
                "",
            );
        }
        if let Some(pre) = &img.preprocessed_image {
            add(
                "TX",
                local_ce("preprocessed-image", "Image as the model saw it"),
                sub.clone(),
                escape(&link(pre)),
                "",
            );
        }
    }
    if let Some(v) = &r.viewer_uri {
        add(
            "TX",
            local_ce("viewer", "Result viewer (every image and overlay)"),
            String::new(),
            escape(&link(v)),
            "",
        );
    }
    if let Some(u) = &r.result_uri {
        add(
            "TX",
            local_ce("result-record", "cinflow.result/v2 record"),
            String::new(),
            escape(&link(u)),
            "",
        );
    }
    for (n, (kind, id, sub, value, units)) in obx.into_iter().enumerate() {
        segs.push(segment(
            "OBX",
            &[
                (1, (n + 1).to_string()),
                (2, kind),
                (3, id),
                (4, sub),
                (5, value),
                (6, units),
                (11, "P".into()),
                (14, ts.clone()),
                (17, method.clone()),
                (18, equipment.clone()),
                (19, ts.clone()),
            ],
        ));
    }
    if let Some(s) = &r.ids.specimen_id {
        segs.push(segment(
            "SPM",
            &[
                (1, "1".into()),
                (
                    2,
                    format!("{}&{}", escape(s), escape(&cfg.sending_application)),
                ),
                (4, "TISS^Tissue^HL70487".into()),
            ],
        ));
    }
    Oru {
        control_id,
        text: segs.join("\r"),
    }
}

/// A probability with six decimals (as in the FHIR report).
fn number(v: f64) -> String {
    format!("{:.6}", (v * 1e6).round() / 1e6)
}

/// The NTE texts: what the result is, its conclusion, its errors.
fn notes(r: &ResultRecord) -> Vec<String> {
    let mut out = vec![format!(
        "PRELIMINARY: computer-assisted grade for decision support by model {} version {} (cinflow); not a diagnosis, to be reviewed by a pathologist.",
        r.model.name, r.model.version
    )];
    if let Some(g) = &r.slide_grade {
        let mut s = format!(
            "Slide grade {}: that of the image with the highest P(CIN2+) among the graded images.",
            g.grade
        );
        if let (Some(t), Some(why)) = (g.triage, &g.triage_reason) {
            s.push_str(&format!(" CIN2+ triage: {t} ({why})."));
        }
        out.push(s);
    }
    if let Some(e) = &r.error {
        out.push(format!("Not graded: {e}"));
    }
    out
}

/// What the LIS answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Ack {
    /// MSA-1: `AA`/`CA` accepted, `AE`/`CE` error, `AR`/`CR` rejected.
    pub code: String,
    /// MSA-2: the control id acknowledged.
    pub control_id: String,
    /// MSA-3 and any ERR segments' texts.
    pub text: String,
}

impl Ack {
    pub fn accepted(&self) -> bool {
        matches!(self.code.as_str(), "AA" | "CA")
    }
}

/// Parses an ACK (segments separated by CR, LF or both).
pub fn parse_ack(msg: &str) -> Result<Ack, String> {
    let segs: Vec<&str> = msg
        .split(['\r', '\n'])
        .filter(|s| !s.trim().is_empty())
        .collect();
    let msh = segs
        .first()
        .filter(|s| s.starts_with("MSH") && s.len() > 4)
        .ok_or_else(|| format!("the answer is not an HL7 message: {:?}", clip(msg)))?;
    let sep = msh[3..].chars().next().unwrap_or('|');
    let msa = segs
        .iter()
        .find(|s| s.starts_with("MSA"))
        .ok_or_else(|| format!("the answer has no MSA segment: {:?}", clip(msg)))?;
    let f: Vec<&str> = msa.split(sep).collect();
    let mut text: Vec<String> = f
        .get(3)
        .filter(|t| !t.is_empty())
        .map(|t| t.to_string())
        .into_iter()
        .collect();
    for err in segs.iter().filter(|s| s.starts_with("ERR")) {
        let e: Vec<&str> = err.split(sep).collect();
        // ERR-8 user message, ERR-7 diagnostics, ERR-3 the error code, ERR-1 (2.4 and before).
        let t = [8, 7, 3, 1]
            .iter()
            .filter_map(|&i| e.get(i))
            .find(|t| !t.is_empty())
            .map(|t| t.replace('^', " "));
        text.extend(t);
    }
    Ok(Ack {
        code: f.get(1).unwrap_or(&"").to_string(),
        control_id: f.get(2).unwrap_or(&"").to_string(),
        text: text.join("; "),
    })
}

fn clip(s: &str) -> String {
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_for_every_delimiter() {
        assert_eq!(escape(r"a|b^c&d~e\f"), r"a\F\b\S\c\T\d\R\e\E\f".to_string());
        assert_eq!(escape("two\r\nlines"), "two  lines");
    }

    #[test]
    fn acks_are_read_in_both_modes() {
        let a = parse_ack("MSH|^~\\&|LIS||CINFLOW||20261130||ACK^R01|1|P|2.5.1\rMSA|AR|abc|unknown patient\rERR||||E||||no such MRN").unwrap();
        assert_eq!((a.code.as_str(), a.control_id.as_str()), ("AR", "abc"));
        assert!(!a.accepted());
        assert_eq!(a.text, "unknown patient; no such MRN");
        let a = parse_ack("MSH|^~\\&|LIS||X||1||ACK|2|P|2.5.1\nMSA|CA|abc").unwrap();
        assert!(a.accepted());
        assert!(parse_ack("HELLO")
            .unwrap_err()
            .contains("not an HL7 message"));
    }
}
