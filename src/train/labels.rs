//! The labels manifest: one row per signed-out image with its grade and patient.

use std::path::{Path, PathBuf};

/// Why a labels file cannot be used. Every message names the file and line.
#[derive(Debug, thiserror::Error)]
pub enum LabelsError {
    #[error("cannot read labels file {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("{path}: header has no {column:?} column (found {found:?}); expected path (or uri/image), label, patient_id")]
    MissingColumn {
        path: String,
        column: &'static str,
        found: Vec<String>,
    },
    #[error("{path} line {line}: {detail}")]
    Line {
        path: String,
        line: usize,
        detail: String,
    },
    #[error("{path}: no labelled images")]
    Empty { path: String },
}

/// One row of a labels CSV.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelRow {
    /// 1-based line number in the file (the header is line 1).
    pub line: usize,
    /// The image file (relative paths and `file://` URIs resolved).
    pub path: PathBuf,
    pub label: String,
    pub patient_id: String,
    /// The slide the image was taken from (optional `slide_id` column); slide-
    /// level figures take each patient's images as one slide without it.
    pub slide_id: Option<String>,
    /// A case the LIS signed out (optional `accession_id` and `signed_out_at`
    /// columns, as `cinflow lis-bridge` writes them).
    pub signed_out: Option<SignedOut>,
}

/// Where a row came from when the LIS signed it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedOut {
    pub accession_id: String,
    /// RFC 3339.
    pub at: String,
}

/// Reads a labels CSV with columns `path` (or `uri`/`image`), `label`,
/// `patient_id` and optionally `slide_id`, `accession_id` and
/// `signed_out_at`; extra columns are ignored. Relative paths resolve against the
/// CSV's folder; `file://` URIs are accepted.
pub fn read_labels(csv_path: &Path) -> Result<Vec<LabelRow>, LabelsError> {
    let p = csv_path.display().to_string();
    let base = csv_path.parent().unwrap_or(Path::new("."));
    let bytes = std::fs::read(csv_path).map_err(|e| LabelsError::Read {
        path: p.clone(),
        detail: e.to_string(),
    })?;
    parse_labels(&p, &bytes, &|raw: &str| {
        if let Some(rest) = raw.strip_prefix("file://") {
            Ok(PathBuf::from(rest))
        } else if let Some((scheme, _)) = raw.split_once("://") {
            Err(format!(
                "{raw:?}: {scheme}:// images are read by the training worker; local mode reads files"
            ))
        } else {
            Ok(base.join(raw))
        }
    })
}

/// Parses labels CSV bytes named `p` (for messages); `resolve` turns each
/// image reference into the local file to read, or says why it cannot.
pub fn parse_labels(
    p: &str,
    bytes: &[u8],
    resolve: &dyn Fn(&str) -> Result<PathBuf, String>,
) -> Result<Vec<LabelRow>, LabelsError> {
    let p = p.to_string();
    let read_err = |detail: String| LabelsError::Read {
        path: p.clone(),
        detail,
    };
    let mut r = csv::Reader::from_reader(bytes);
    let headers: Vec<String> = r
        .headers()
        .map_err(|e| read_err(e.to_string()))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let col = |names: &[&str], column: &'static str| {
        headers
            .iter()
            .position(|h| names.contains(&h.as_str()))
            .ok_or_else(|| LabelsError::MissingColumn {
                path: p.clone(),
                column,
                found: headers.clone(),
            })
    };
    let cp = col(&["path", "uri", "image"], "path")?;
    let cl = col(&["label"], "label")?;
    let ci = col(&["patient_id"], "patient_id")?;
    let cs = headers.iter().position(|h| h == "slide_id");
    let ca = headers.iter().position(|h| h == "accession_id");
    let ct = headers.iter().position(|h| h == "signed_out_at");
    let mut rows = Vec::new();
    for (i, rec) in r.records().enumerate() {
        let line = i + 2;
        let line_err = |detail: String| LabelsError::Line {
            path: p.clone(),
            line,
            detail,
        };
        let rec = rec.map_err(|e| line_err(format!("malformed CSV ({e})")))?;
        let get = |c: usize| rec.get(c).map(str::trim).unwrap_or("");
        if get(cp).is_empty() || get(cl).is_empty() || get(ci).is_empty() {
            return Err(line_err(
                "path, label and patient_id must all be set".into(),
            ));
        }
        let path = resolve(get(cp)).map_err(line_err)?;
        rows.push(LabelRow {
            line,
            path,
            label: get(cl).to_string(),
            patient_id: get(ci).to_string(),
            slide_id: cs.map(get).filter(|s| !s.is_empty()).map(String::from),
            signed_out: match (ca.map(get), ct.map(get)) {
                (Some(a), Some(t)) if !a.is_empty() && !t.is_empty() => Some(SignedOut {
                    accession_id: a.to_string(),
                    at: t.to_string(),
                }),
                _ => None,
            },
        });
    }
    if rows.is_empty() {
        return Err(LabelsError::Empty { path: p });
    }
    Ok(rows)
}

/// Writes rows as a labels CSV whose paths are relative to `base` where
/// possible (with a `slide_id` column when any row has one, and the sign-out
/// columns when any row was signed out).
pub fn write_labels(path: &Path, base: &Path, rows: &[LabelRow]) -> std::io::Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    let slides = rows.iter().any(|r| r.slide_id.is_some());
    let signed = rows.iter().any(|r| r.signed_out.is_some());
    let mut header = vec!["path", "label", "patient_id"];
    if slides {
        header.push("slide_id");
    }
    if signed {
        header.extend(["accession_id", "signed_out_at"]);
    }
    w.write_record(&header)?;
    for r in rows {
        let rel = r.path.strip_prefix(base).unwrap_or(&r.path);
        let rel = rel.display().to_string();
        let mut record = vec![rel.as_str(), &r.label, &r.patient_id];
        if slides {
            record.push(r.slide_id.as_deref().unwrap_or(""));
        }
        if signed {
            let s = r.signed_out.as_ref();
            record.push(s.map_or("", |s| s.accession_id.as_str()));
            record.push(s.map_or("", |s| s.at.as_str()));
        }
        w.write_record(&record)?;
    }
    w.flush()
}

/// How many signed-out cases (accessions) and images `rows` hold, in all and
/// signed out at or after `since` (RFC 3339, whole seconds: the parent model's creation).
pub fn signed_out_counts(rows: &[&LabelRow], since: Option<&str>) -> serde_json::Value {
    let parse = |t: &str| chrono::DateTime::parse_from_rfc3339(t).ok();
    let since = since.and_then(parse);
    let mut cases = std::collections::BTreeSet::new();
    let mut new_cases = std::collections::BTreeSet::new();
    let (mut images, mut new_images) = (0usize, 0usize);
    for s in rows.iter().filter_map(|r| r.signed_out.as_ref()) {
        cases.insert(s.accession_id.as_str());
        images += 1;
        let newer = match (since, parse(&s.at)) {
            (Some(since), Some(at)) => at >= since,
            (None, _) => true,
            (Some(_), None) => false,
        };
        if newer {
            new_cases.insert(s.accession_id.as_str());
            new_images += 1;
        }
    }
    serde_json::json!({
        "cases": cases.len(),
        "images": images,
        "added_since_parent": { "cases": new_cases.len(), "images": new_images },
        "parent_created_at": since.map(|t| t.to_rfc3339()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_resolve_relative_paths_and_name_bad_lines() {
        let d = tempfile::tempdir().unwrap();
        let csv = d.path().join("labels.csv");
        std::fs::write(
            &csv,
            "path,label,patient_id,extra\na.jpg,CIN2,P1,x\n/abs/b.jpg,CIN3,P2,y\nfile:///c/d.png,CIN1,P3,z\n",
        )
        .unwrap();
        let rows = read_labels(&csv).unwrap();
        assert_eq!(rows[0].path, d.path().join("a.jpg"));
        assert_eq!(rows[1].path, PathBuf::from("/abs/b.jpg"));
        assert_eq!(rows[2].path, PathBuf::from("/c/d.png"));
        assert_eq!((rows[1].line, rows[1].label.as_str()), (3, "CIN3"));
        assert_eq!(rows[0].slide_id, None);
        assert_eq!(rows[0].signed_out, None);

        // An optional slide_id column, and a round trip through write_labels.
        std::fs::write(
            &csv,
            "path,label,patient_id,slide_id\na.jpg,CIN2,P1,S1\nb.jpg,CIN1,P1,\n",
        )
        .unwrap();
        let rows = read_labels(&csv).unwrap();
        assert_eq!(rows[0].slide_id.as_deref(), Some("S1"));
        assert_eq!(rows[1].slide_id, None);
        let again = d.path().join("again.csv");
        write_labels(&again, d.path(), &rows).unwrap();
        assert_eq!(read_labels(&again).unwrap(), rows);

        // Sign-out columns as the LIS bridge writes them, counted since a parent.
        std::fs::write(
            &csv,
            "path,label,patient_id,slide_id,accession_id,signed_out_at,job_id\n\
             a.jpg,CIN2,P1,,,,\n\
             b.jpg,CIN3,P2,S2,A1,2026-11-01T10:00:00Z,j1\n\
             c.jpg,CIN3,P2,S2,A1,2026-11-01T10:00:00Z,j1\n\
             d.jpg,CIN1,P3,S3,A2,2026-12-01T08:15:00Z,j2\n",
        )
        .unwrap();
        let rows = read_labels(&csv).unwrap();
        assert_eq!(rows[0].signed_out, None);
        assert_eq!(rows[1].signed_out.as_ref().unwrap().accession_id, "A1");
        let refs: Vec<&LabelRow> = rows.iter().collect();
        let c = signed_out_counts(&refs, Some("2026-11-15T00:00:00Z"));
        assert_eq!(
            (c["cases"].as_u64(), c["images"].as_u64()),
            (Some(2), Some(3))
        );
        assert_eq!(c["added_since_parent"]["cases"], 1);
        assert_eq!(c["added_since_parent"]["images"], 1);
        write_labels(&again, d.path(), &rows).unwrap();
        assert_eq!(read_labels(&again).unwrap(), rows);

        std::fs::write(&csv, "path,label,patient_id\na.jpg,CIN2,P1\nb.jpg,,P2\n").unwrap();
        let e = read_labels(&csv).unwrap_err().to_string();
        assert!(e.contains("line 3"), "{e}");

        std::fs::write(&csv, "file,label\na.jpg,CIN2\n").unwrap();
        let e = read_labels(&csv).unwrap_err().to_string();
        assert!(e.contains("no \"path\" column"), "{e}");

        std::fs::write(&csv, "path,label,patient_id\n").unwrap();
        assert!(matches!(read_labels(&csv), Err(LabelsError::Empty { .. })));
    }
}
