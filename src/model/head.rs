//! The linear head `z = W * GAP(A) + b` and its probabilities.

use std::path::Path;

use safetensors::{tensor::TensorView, Dtype, SafeTensors};

use super::Task;

/// Why a head file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("head file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("head file {path} is not a valid safetensors file: {detail}")]
    Format { path: String, detail: String },
    #[error("head file {path}: {detail}")]
    Shape { path: String, detail: String },
    #[error("cannot fit a head: {0}")]
    Fit(String),
}

/// Weights `[rows x channels]` (row-major) and bias `[rows]` of the linear head.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    pub rows: usize,
    pub channels: usize,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

impl Head {
    /// Reads `weight` and `bias` (float32) from a safetensors file.
    pub fn load(path: &Path) -> Result<Head, HeadError> {
        let p = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| HeadError::Io {
            path: p.clone(),
            source,
        })?;
        Self::from_bytes(&bytes, &p)
    }

    /// Parses a safetensors buffer; `name` only labels errors.
    pub fn from_bytes(bytes: &[u8], name: &str) -> Result<Head, HeadError> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| HeadError::Format {
            path: name.into(),
            detail: e.to_string(),
        })?;
        let get = |t: &str| -> Result<(Vec<usize>, Vec<f32>), HeadError> {
            let view = st.tensor(t).map_err(|_| HeadError::Shape {
                path: name.into(),
                detail: format!("missing tensor {t:?} (has {:?})", st.names()),
            })?;
            if view.dtype() != Dtype::F32 {
                return Err(HeadError::Shape {
                    path: name.into(),
                    detail: format!("tensor {t:?} is {:?}, expected F32", view.dtype()),
                });
            }
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Ok((view.shape().to_vec(), data))
        };
        let (wshape, weight) = get("weight")?;
        let (bshape, bias) = get("bias")?;
        if wshape.len() != 2 || bshape.len() != 1 || bshape[0] != wshape[0] {
            return Err(HeadError::Shape {
                path: name.into(),
                detail: format!(
                    "weight {wshape:?} and bias {bshape:?} are not [rows x channels] and [rows]"
                ),
            });
        }
        let head = Head {
            rows: wshape[0],
            channels: wshape[1],
            weight,
            bias,
        };
        if let Some(bad) = head
            .weight
            .iter()
            .chain(&head.bias)
            .find(|v| !v.is_finite())
        {
            return Err(HeadError::Shape {
                path: name.into(),
                detail: format!("contains a non-finite value ({bad})"),
            });
        }
        Ok(head)
    }

    /// Serialises to safetensors bytes (`weight`, `bias`, float32 little-endian).
    pub fn to_bytes(&self) -> Vec<u8> {
        let w: Vec<u8> = self.weight.iter().flat_map(|v| v.to_le_bytes()).collect();
        let b: Vec<u8> = self.bias.iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensors = [
            (
                "weight",
                TensorView::new(Dtype::F32, vec![self.rows, self.channels], &w)
                    .expect("weight buffer matches its shape"),
            ),
            (
                "bias",
                TensorView::new(Dtype::F32, vec![self.rows], &b).expect("bias buffer matches"),
            ),
        ];
        safetensors::serialize(tensors, None).expect("two small f32 tensors serialise")
    }

    /// Logits `W * pooled + b`; accumulates in f64 so the CAM identity holds to 1e-4.
    pub fn logits(&self, pooled: &[f32]) -> Vec<f32> {
        assert_eq!(pooled.len(), self.channels, "pooled features vs head width");
        (0..self.rows)
            .map(|r| {
                let row = &self.weight[r * self.channels..(r + 1) * self.channels];
                let dot: f64 = row
                    .iter()
                    .zip(pooled)
                    .map(|(w, a)| f64::from(*w) * f64::from(*a))
                    .sum();
                (dot + f64::from(self.bias[r])) as f32
            })
            .collect()
    }
}

/// Probabilities per class from logits: softmax (multiclass) or `[s, 1 - s]` with
/// `s = sigmoid(z)` for the single binary logit.
pub fn probabilities(task: Task, logits: &[f32]) -> Vec<f32> {
    match task {
        Task::Multiclass => {
            let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f64> = logits.iter().map(|z| f64::from(z - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| (v / s) as f32).collect()
        }
        Task::Binary => {
            let z = f64::from(logits[0]);
            let p = 1.0 / (1.0 + (-z).exp());
            vec![p as f32, (1.0 - p) as f32]
        }
    }
}

/// Fits a diagonal linear discriminant (Gaussian classes with one shared diagonal
/// covariance) on pooled features: the simplest honest linear head, used until a
/// head is trained with tch. `labels[i]` indexes `classes`. For a binary task the
/// single logit is the difference of the two class scores.
pub fn fit_diagonal_lda(
    task: Task,
    n_classes: usize,
    features: &[Vec<f32>],
    labels: &[usize],
) -> Result<Head, HeadError> {
    let k = features
        .first()
        .map(Vec::len)
        .ok_or_else(|| HeadError::Fit("no examples".into()))?;
    let mut count = vec![0usize; n_classes];
    let mut mean = vec![vec![0f64; k]; n_classes];
    for (x, &y) in features.iter().zip(labels) {
        if y >= n_classes || x.len() != k {
            return Err(HeadError::Fit(format!(
                "bad example: label {y}, {} features",
                x.len()
            )));
        }
        count[y] += 1;
        for (m, v) in mean[y].iter_mut().zip(x) {
            *m += f64::from(*v);
        }
    }
    if let Some(c) = count.iter().position(|&c| c == 0) {
        return Err(HeadError::Fit(format!("class index {c} has no examples")));
    }
    for (m, &c) in mean.iter_mut().zip(&count) {
        m.iter_mut().for_each(|v| *v /= c as f64);
    }
    let mut var = vec![0f64; k];
    for (x, &y) in features.iter().zip(labels) {
        for ((s, v), m) in var.iter_mut().zip(x).zip(&mean[y]) {
            *s += (f64::from(*v) - m).powi(2);
        }
    }
    let dof = (features.len().saturating_sub(n_classes)).max(1) as f64;
    var.iter_mut().for_each(|v| *v /= dof);
    let floor = 1e-3 * var.iter().sum::<f64>() / k as f64 + 1e-12;
    var.iter_mut().for_each(|v| *v = v.max(floor));

    // Discriminant scores x'S^-1 mu_c - mu_c'S^-1 mu_c / 2 + ln(prior_c), written
    // around the overall mean m (which shifts every score by the same amount, so
    // the probabilities are unchanged): w_c = S^-1 (mu_c - m). Each class's
    // Grad-CAM map then shows evidence for that class relative to the average
    // image, instead of the part every class shares.
    let n = features.len() as f64;
    let overall: Vec<f64> = (0..k)
        .map(|j| {
            (0..n_classes)
                .map(|c| mean[c][j] * count[c] as f64)
                .sum::<f64>()
                / n
        })
        .collect();
    let score = |c: usize| -> (Vec<f64>, f64) {
        let d: Vec<f64> = mean[c].iter().zip(&overall).map(|(a, m)| a - m).collect();
        let w: Vec<f64> = d.iter().zip(&var).map(|(d, v)| d / v).collect();
        let b = -w.iter().zip(&overall).map(|(w, m)| w * m).sum::<f64>()
            - 0.5 * w.iter().zip(&d).map(|(w, d)| w * d).sum::<f64>()
            + (count[c] as f64 / n).ln();
        (w, b)
    };
    let (w, b): (Vec<Vec<f64>>, Vec<f64>) = (0..n_classes).map(score).unzip();
    let (weight, bias): (Vec<f32>, Vec<f32>) = match task {
        Task::Multiclass => (
            w.iter().flatten().map(|v| *v as f32).collect(),
            b.iter().map(|v| *v as f32).collect(),
        ),
        Task::Binary => (
            w[0].iter()
                .zip(&w[1])
                .map(|(a, c)| (a - c) as f32)
                .collect(),
            vec![(b[0] - b[1]) as f32],
        ),
    };
    Ok(Head {
        rows: bias.len(),
        channels: k,
        weight,
        bias,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip() {
        let h = Head {
            rows: 2,
            channels: 3,
            weight: vec![1.0, -2.0, 3.5, 0.0, 0.25, -1.0],
            bias: vec![0.5, -0.5],
        };
        assert_eq!(Head::from_bytes(&h.to_bytes(), "mem").unwrap(), h);
    }

    #[test]
    fn bad_bytes_name_the_problem() {
        let e = Head::from_bytes(b"nonsense", "x.safetensors").unwrap_err();
        assert!(e.to_string().contains("x.safetensors"), "{e}");
    }

    #[test]
    fn softmax_and_sigmoid_match_closed_forms() {
        let p = probabilities(Task::Multiclass, &[0.0, (2f32).ln()]);
        assert!((p[0] - 1.0 / 3.0).abs() < 1e-6 && (p[1] - 2.0 / 3.0).abs() < 1e-6);
        let p = probabilities(Task::Binary, &[0.0]);
        assert_eq!(p, vec![0.5, 0.5]);
        let p = probabilities(Task::Binary, &[(3f32).ln()]);
        assert!((p[0] - 0.75).abs() < 1e-6);
    }

    #[test]
    fn discriminant_separates_separable_classes() {
        // Two well separated clusters in 2-D: every training point is classified correctly.
        let xs: Vec<Vec<f32>> = (0..20)
            .map(|i| {
                let c = (i % 2) as f32;
                vec![
                    c * 4.0 + (i as f32 * 0.37).sin(),
                    -c * 3.0 + (i as f32 * 0.91).cos(),
                ]
            })
            .collect();
        let ys: Vec<usize> = (0..20).map(|i| i % 2).collect();
        let h = fit_diagonal_lda(Task::Multiclass, 2, &xs, &ys).unwrap();
        for (x, y) in xs.iter().zip(&ys) {
            let z = h.logits(x);
            assert_eq!(usize::from(z[1] > z[0]), *y);
        }
        let hb = fit_diagonal_lda(Task::Binary, 2, &xs, &ys).unwrap();
        for (x, y) in xs.iter().zip(&ys) {
            assert_eq!(usize::from(hb.logits(x)[0] < 0.0), *y);
        }
        assert!(fit_diagonal_lda(Task::Multiclass, 3, &xs, &ys).is_err());
    }
}
