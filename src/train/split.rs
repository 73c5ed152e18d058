//! Patient-level train / validation / locked-test split.
//!
//! No patient is ever in two splits. Patients keep the split they had in the
//! previous model's record (so the test split stays locked across nightly
//! retrains); new patients are assigned per class (their most severe grade),
//! shuffled by the seed, to whichever split is furthest below its target share.

use std::collections::{BTreeMap, BTreeSet};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

/// One of the three splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Validation,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Validation, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }
}

/// Shares of patients per split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitFractions {
    pub validation: f64,
    pub test: f64,
}

/// Why no valid split exists.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    #[error("patient {patient:?} would be in both the {a} and the {b} split")]
    Leak {
        patient: String,
        a: &'static str,
        b: &'static str,
    },
    #[error("class {class:?} has no images in the {split} split ({patients} patients of that class in all; each class needs at least 3 patients, one per split)")]
    EmptyClass {
        class: String,
        split: &'static str,
        patients: usize,
    },
    #[error("split fractions must be positive and leave room for training (validation {validation}, test {test})")]
    Fractions { validation: f64, test: f64 },
}

/// The assignment of every patient, and how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitPlan {
    pub seed: u64,
    pub fractions: SplitFractions,
    /// Patients whose split came from the previous model's record.
    pub kept_from_previous: usize,
    pub assignment: BTreeMap<String, Split>,
}

/// Assigns patients to splits. `patients` maps each patient to its class index
/// (most severe first, so the smallest index of its images); `previous` is an
/// earlier plan's assignment.
pub fn assign(
    patients: &BTreeMap<String, usize>,
    n_classes: usize,
    previous: Option<&BTreeMap<String, Split>>,
    fractions: SplitFractions,
    seed: u64,
) -> Result<SplitPlan, SplitError> {
    let SplitFractions { validation, test } = fractions;
    if !(validation > 0.0 && test > 0.0 && validation + test < 1.0) {
        return Err(SplitError::Fractions { validation, test });
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut assignment = BTreeMap::new();
    let mut kept = 0;
    for class in 0..n_classes {
        let group: Vec<&String> = patients
            .iter()
            .filter(|(_, &c)| c == class)
            .map(|(p, _)| p)
            .collect();
        let n = group.len() as f64;
        let target = |s: Split| match s {
            Split::Test => (n * test).round().max(1.0),
            Split::Validation => (n * validation).round().max(1.0),
            Split::Train => (n * (1.0 - test - validation)).round().max(1.0),
        };
        let mut count: BTreeMap<Split, f64> = BTreeMap::new();
        let mut fresh = Vec::new();
        for p in group {
            match previous.and_then(|prev| prev.get(p)) {
                Some(&s) => {
                    assignment.insert(p.clone(), s);
                    *count.entry(s).or_default() += 1.0;
                    kept += 1;
                }
                None => fresh.push(p),
            }
        }
        fresh.shuffle(&mut rng);
        for p in fresh {
            // Largest shortfall against the target first; test, then validation,
            // then train on ties, so small classes still reach every split.
            let s = [Split::Test, Split::Validation, Split::Train]
                .into_iter()
                .max_by(|a, b| {
                    let gap = |s: &Split| target(*s) - count.get(s).copied().unwrap_or(0.0);
                    gap(a).total_cmp(&gap(b)).then(a.cmp(b))
                })
                .expect("three splits");
            assignment.insert(p.clone(), s);
            *count.entry(s).or_default() += 1.0;
        }
    }
    Ok(SplitPlan {
        seed,
        fractions,
        kept_from_previous: kept,
        assignment,
    })
}

/// Fails if any patient appears in two splits of `(patient, split)` pairs (one per
/// image), or if a class has no image in some split.
pub fn check(images: &[(String, Split, usize)], classes: &[String]) -> Result<(), SplitError> {
    let mut seen: BTreeMap<&str, Split> = BTreeMap::new();
    for (patient, split, _) in images {
        if let Some(&other) = seen.get(patient.as_str()) {
            if other != *split {
                return Err(SplitError::Leak {
                    patient: patient.clone(),
                    a: other.name(),
                    b: split.name(),
                });
            }
        }
        seen.insert(patient, *split);
    }
    for (c, class) in classes.iter().enumerate() {
        for s in Split::ALL {
            if !images.iter().any(|(_, sp, y)| *sp == s && *y == c) {
                let patients: BTreeSet<&str> = images
                    .iter()
                    .filter(|(_, _, y)| *y == c)
                    .map(|(p, _, _)| p.as_str())
                    .collect();
                return Err(SplitError::EmptyClass {
                    class: class.clone(),
                    split: s.name(),
                    patients: patients.len(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patients(n: usize, classes: usize) -> BTreeMap<String, usize> {
        (0..n).map(|i| (format!("P{i:03}"), i % classes)).collect()
    }

    const F: SplitFractions = SplitFractions {
        validation: 0.2,
        test: 0.1,
    };

    #[test]
    fn shares_follow_the_fractions_per_class_and_the_seed() {
        let p = patients(200, 4);
        let plan = assign(&p, 4, None, F, 1).unwrap();
        for class in 0..4 {
            let n = |s| {
                plan.assignment
                    .iter()
                    .filter(|(k, v)| p[*k] == class && **v == s)
                    .count()
            };
            assert_eq!(
                (n(Split::Train), n(Split::Validation), n(Split::Test)),
                (35, 10, 5)
            );
        }
        assert_eq!(plan, assign(&p, 4, None, F, 1).unwrap());
        assert_ne!(
            plan.assignment,
            assign(&p, 4, None, F, 2).unwrap().assignment
        );
    }

    #[test]
    fn earlier_patients_keep_their_split_when_new_ones_arrive() {
        let p = patients(80, 4);
        let first = assign(&p, 4, None, F, 5).unwrap();
        let mut more = p.clone();
        more.extend((80..88).map(|i| (format!("P{i:03}"), i % 4)));
        let second = assign(&more, 4, Some(&first.assignment), F, 5).unwrap();
        assert_eq!(second.kept_from_previous, 80);
        for (k, v) in &first.assignment {
            assert_eq!(second.assignment[k], *v);
        }
        assert_eq!(second.assignment.len(), 88);
    }

    #[test]
    fn small_classes_still_reach_every_split_and_leaks_are_caught() {
        let p = patients(12, 4); // three patients per class
        let plan = assign(&p, 4, None, F, 0).unwrap();
        let classes: Vec<String> = (0..4).map(|c| format!("c{c}")).collect();
        let images: Vec<_> = p
            .iter()
            .map(|(k, &c)| (k.clone(), plan.assignment[k], c))
            .collect();
        check(&images, &classes).unwrap();

        let mut leaked = images.clone();
        let (p0, s0, c0) = leaked[0].clone();
        let other = if s0 == Split::Test {
            Split::Train
        } else {
            Split::Test
        };
        leaked.push((p0.clone(), other, c0));
        let e = check(&leaked, &classes).unwrap_err().to_string();
        assert!(e.contains(&p0) && e.contains("both"), "{e}");

        let two = patients(8, 4); // two patients per class cannot fill three splits
        let plan = assign(&two, 4, None, F, 0).unwrap();
        let images: Vec<_> = two
            .iter()
            .map(|(k, &c)| (k.clone(), plan.assignment[k], c))
            .collect();
        let e = check(&images, &classes).unwrap_err().to_string();
        assert!(e.contains("at least 3 patients"), "{e}");
    }
}
