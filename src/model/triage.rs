//! The CIN2+ question and its refer band.
//!
//! What decides treatment is whether a lesion is CIN2 or worse (treat) or CIN1
//! or less (follow up). For 4- and 3-class models P(CIN2+) is the sum of the
//! calibrated probabilities of the CIN2+ classes (CIN3 + CIN2, or CIN2-3).
//! Two thresholds on it, chosen on the validation split when the model is
//! trained and stored in the bundle, triage every image and slide:
//!
//! - `CIN2+ likely`: P(CIN2+) at or above the **rule-in** threshold (chosen
//!   for a high specificity: few CIN1-or-less images reach it);
//! - `CIN2+ unlikely`: P(CIN2+) below the **rule-out** threshold (chosen for
//!   a high sensitivity, 95% by default: few CIN2+ images fall below it);
//! - `refer`: in between, or when part of the slide could not be graded — the
//!   model cannot call it either way, a pathologist must.
//!
//! 2-class models (CIN vs Non-neoplasm) cannot separate CIN1 from CIN2+, so
//! they serve no P(CIN2+) and no triage.

use serde::{Deserialize, Serialize};

/// Name of the clinical question, as results and reports write it.
pub const CIN2_PLUS: &str = "CIN2+";

/// Classes that are CIN2 or worse, in any scheme.
const CIN2_PLUS_CLASSES: [&str; 3] = ["CIN3", "CIN2", "CIN2-3"];

/// Rows of `classes` whose probabilities add up to P(CIN2+); empty when the
/// scheme does not separate CIN2+ from CIN1 (2 classes).
pub fn cin2_plus_rows(classes: &[String]) -> Vec<usize> {
    if classes.len() < 3 {
        return Vec::new();
    }
    (0..classes.len())
        .filter(|&i| CIN2_PLUS_CLASSES.contains(&classes[i].as_str()))
        .collect()
}

/// P(CIN2+) of each image's probabilities and whether its label is CIN2+;
/// None when the classes do not separate CIN2+ (2 classes).
pub fn cin2_plus_scores(
    classes: &[String],
    probabilities: &[Vec<f64>],
    labels: &[usize],
) -> Option<(Vec<f64>, Vec<bool>)> {
    let rows = cin2_plus_rows(classes);
    if rows.is_empty() {
        return None;
    }
    let scores = probabilities
        .iter()
        .map(|p| rows.iter().map(|&i| p[i]).sum())
        .collect();
    let positive = labels.iter().map(|c| rows.contains(c)).collect();
    Some((scores, positive))
}

/// What one image or slide is triaged as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Triage {
    #[serde(rename = "CIN2+ likely")]
    Likely,
    #[serde(rename = "refer")]
    Refer,
    #[serde(rename = "CIN2+ unlikely")]
    Unlikely,
}

impl Triage {
    /// The words results and reports use.
    pub fn as_str(self) -> &'static str {
        match self {
            Triage::Likely => "CIN2+ likely",
            Triage::Refer => "refer",
            Triage::Unlikely => "CIN2+ unlikely",
        }
    }

    /// A code without spaces or signs (FHIR codes, file names).
    pub fn code(self) -> &'static str {
        match self {
            Triage::Likely => "cin2plus-likely",
            Triage::Refer => "refer",
            Triage::Unlikely => "cin2plus-unlikely",
        }
    }
}

impl std::fmt::Display for Triage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One threshold on P(CIN2+): an image is called CIN2+ when its P(CIN2+) is
/// at or above it. `target` is what it was chosen to reach on the split it was
/// fitted on; `sensitivity` and `specificity` what it reached there.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OperatingPoint {
    pub threshold: f64,
    pub target: f64,
    pub sensitivity: f64,
    pub specificity: f64,
}

/// The two thresholds of the CIN2+ triage and where they were chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferBand {
    /// The classes whose probabilities are summed into P(CIN2+).
    pub classes: Vec<String>,
    /// The split the thresholds were chosen on (`validation`), its images
    /// that are CIN2+ (`positives`) and CIN1 or less (`negatives`).
    pub fitted_on: String,
    pub positives: usize,
    pub negatives: usize,
    /// High-sensitivity threshold (`target`: the sensitivity asked for):
    /// below it, `CIN2+ unlikely`.
    pub rule_out: OperatingPoint,
    /// High-specificity threshold (`target`: the specificity asked for): at
    /// or above it, `CIN2+ likely`. Never below `rule_out`; equal to it when
    /// one threshold meets both targets (no refer band on this split).
    pub rule_in: OperatingPoint,
}

impl ReferBand {
    /// Triage of an image with probability `p` of CIN2+.
    pub fn triage(&self, p: f64) -> Triage {
        if p >= self.rule_in.threshold {
            Triage::Likely
        } else if p < self.rule_out.threshold {
            Triage::Unlikely
        } else {
            Triage::Refer
        }
    }

    /// Consistency checks against the model's classes: every problem found.
    pub fn problems(&self, classes: &[String]) -> Vec<String> {
        let mut p = Vec::new();
        let expected: Vec<String> = cin2_plus_rows(classes)
            .into_iter()
            .map(|i| classes[i].clone())
            .collect();
        if expected.is_empty() {
            p.push(format!(
                "a CIN2+ refer band needs a 4- or 3-class model; classes are {classes:?}"
            ));
        } else if self.classes != expected {
            p.push(format!(
                "refer band sums {:?}, but the CIN2+ classes of {classes:?} are {expected:?}",
                self.classes
            ));
        }
        for (name, o) in [("rule_out", &self.rule_out), ("rule_in", &self.rule_in)] {
            let unit = |v: f64| (0.0..=1.0).contains(&v);
            // A threshold just above 1 means "never": no P(CIN2+) reaches it.
            let in_range = o.threshold.is_finite()
                && (0.0..=1.0 + 1e-9).contains(&o.threshold)
                && unit(o.target)
                && unit(o.sensitivity)
                && unit(o.specificity);
            if !in_range {
                p.push(format!("refer band {name} {o:?} is out of range [0, 1]"));
            }
        }
        if self.rule_in.threshold < self.rule_out.threshold {
            p.push(format!(
                "refer band rule_in threshold {} is below rule_out threshold {}",
                self.rule_in.threshold, self.rule_out.threshold
            ));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(c: &[&str]) -> Vec<String> {
        c.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn cin2_plus_is_cin3_and_cin2_or_the_merged_class() {
        assert_eq!(
            cin2_plus_rows(&names(&["CIN3", "CIN2", "CIN1", "Non-neoplasm"])),
            [0, 1]
        );
        assert_eq!(
            cin2_plus_rows(&names(&["CIN2-3", "CIN1", "Non-neoplasm"])),
            [0]
        );
        assert!(cin2_plus_rows(&names(&["CIN", "Non-neoplasm"])).is_empty());
    }

    #[test]
    fn triage_uses_both_thresholds() {
        let point = |threshold| OperatingPoint {
            threshold,
            target: 0.95,
            sensitivity: 1.0,
            specificity: 1.0,
        };
        let band = ReferBand {
            classes: names(&["CIN3", "CIN2"]),
            fitted_on: "validation".into(),
            positives: 10,
            negatives: 10,
            rule_out: point(0.2),
            rule_in: point(0.7),
        };
        assert_eq!(band.triage(0.19), Triage::Unlikely);
        assert_eq!(band.triage(0.2), Triage::Refer);
        assert_eq!(band.triage(0.69), Triage::Refer);
        assert_eq!(band.triage(0.7), Triage::Likely);
        let classes = names(&["CIN3", "CIN2", "CIN1", "Non-neoplasm"]);
        assert!(band.problems(&classes).is_empty());
        let inverted = ReferBand {
            rule_in: point(0.1),
            ..band.clone()
        };
        assert!(inverted.problems(&classes)[0].contains("below rule_out"));
        assert!(band.problems(&names(&["CIN", "Non-neoplasm"]))[0].contains("4- or 3-class"));
        assert_eq!(
            serde_json::to_string(&[Triage::Likely, Triage::Refer, Triage::Unlikely]).unwrap(),
            r#"["CIN2+ likely","refer","CIN2+ unlikely"]"#
        );
    }
}
