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
}

/// Reads a labels CSV with columns `path` (or `uri`/`image`), `label`,
/// `patient_id` and optionally `slide_id`; extra columns are ignored. Relative paths resolve against the
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
        });
    }
    if rows.is_empty() {
        return Err(LabelsError::Empty { path: p });
    }
    Ok(rows)
}

/// Writes rows as a labels CSV whose paths are relative to `base` where
/// possible (with a `slide_id` column when any row has one).
pub fn write_labels(path: &Path, base: &Path, rows: &[LabelRow]) -> std::io::Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    let slides = rows.iter().any(|r| r.slide_id.is_some());
    let mut header = vec!["path", "label", "patient_id"];
    if slides {
        header.push("slide_id");
    }
    w.write_record(&header)?;
    for r in rows {
        let rel = r.path.strip_prefix(base).unwrap_or(&r.path);
        let rel = rel.display().to_string();
        let mut record = vec![rel.as_str(), &r.label, &r.patient_id];
        if slides {
            record.push(r.slide_id.as_deref().unwrap_or(""));
        }
        w.write_record(&record)?;
    }
    w.flush()
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
