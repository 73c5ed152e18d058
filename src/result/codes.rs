//! The codes every clinical output uses, in one table: SNOMED CT for the
//! grades, LOINC for the report, and cinflow's own code system (one fixed URL,
//! whatever identifier systems a lab configures) for what no standard codes.
//!
//! The SNOMED CT codes were checked against published cervical histology value
//! sets (docs/lis.md, "Codes"):
//! - CIN3 20365006 |Squamous intraepithelial neoplasia, grade III (morphologic
//!   abnormality)|, the code those value sets use for CIN 3;
//! - CIN2 285838002 |Cervical intraepithelial neoplasia grade 2 (disorder)|;
//! - CIN1 285836003 |Cervical intraepithelial neoplasia grade 1 (disorder)|;
//! - CIN2-3 (the 3-class merge) 22725004 |High-grade squamous intraepithelial
//!   lesion (morphologic abnormality)|.
//!
//! `Non-neoplasm` and the 2-class `CIN` have no SNOMED CT concept of exactly
//! their meaning ("Non-neoplasm" covers normal, inflamed and reactive tissue;
//! "Biopsy result normal" would say less than that), so they carry cinflow's
//! code alone rather than a code that claims something else.

/// cinflow's own code system: observation codes, grades, triage.
pub const CODE_SYSTEM: &str = "https://cinflow.org/fhir/CodeSystem/cinflow";
/// The same in HL7 v2 (a local coding system, `99zzz`).
pub const HL7_LOCAL: &str = "99CIN";
pub const SNOMED: &str = "http://snomed.info/sct";
pub const LOINC: &str = "http://loinc.org";
pub const UCUM: &str = "http://unitsofmeasure.org";

/// LOINC 65753-6 "Cervix Pathology biopsy report": the report's code.
pub const LOINC_CERVIX_BIOPSY: (&str, &str) = ("65753-6", "Cervix Pathology biopsy report");
/// LOINC 11526-1 "Pathology study": the report's second, general code.
pub const LOINC_PATHOLOGY_STUDY: (&str, &str) = ("11526-1", "Pathology study");

/// The security label of content a model asserted (HL7 v3 ObservationValue).
pub const AI_ASSERTED: (&str, &str, &str) = (
    "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "AIAST",
    "Artificial Intelligence asserted",
);

/// A grade's SNOMED CT concept (code, display), where one means exactly it.
pub fn snomed_grade(class: &str) -> Option<(&'static str, &'static str)> {
    Some(match class {
        "CIN3" => ("20365006", "Squamous intraepithelial neoplasia, grade III"),
        "CIN2" => ("285838002", "Cervical intraepithelial neoplasia grade 2"),
        "CIN1" => ("285836003", "Cervical intraepithelial neoplasia grade 1"),
        "CIN2-3" => ("22725004", "High-grade squamous intraepithelial lesion"),
        _ => return None,
    })
}

/// cinflow's code of a grade (the class name in the code system's form).
pub fn grade_code(class: &str) -> String {
    format!("grade-{}", super::class_slug(class))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cin_grade_of_the_schemes_has_its_snomed_code() {
        let codes: Vec<_> = ["CIN3", "CIN2", "CIN1", "CIN2-3", "CIN", "Non-neoplasm"]
            .iter()
            .map(|c| snomed_grade(c).map(|(code, _)| code))
            .collect();
        assert_eq!(
            codes,
            [
                Some("20365006"),
                Some("285838002"),
                Some("285836003"),
                Some("22725004"),
                None,
                None
            ]
        );
        assert_eq!(grade_code("Non-neoplasm"), "grade-Non-neoplasm");
    }
}
