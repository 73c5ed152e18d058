//! Grad-CAM from the exact identity vs Grad-CAM by automatic differentiation in
//! libtorch (tch), on real backbone features and on DenseNet-161-sized ones.
#![cfg(feature = "train")]

mod common;

use cinflow::cam::class_maps;
use cinflow::infer::{FeatureMap, InferConfig};
use cinflow::model::{Head, Task};
use cinflow::pipeline::Model;
use tch::{Kind, Tensor};

/// Selvaraju et al.: alpha_ck = mean_ij dz_c/dA_kij, map = ReLU(sum_k alpha_ck A_k),
/// computed by autograd in float64 through z = W * GAP(A) + b (a binary head's
/// second class has logit -z).
fn autograd_gradcam(f: &FeatureMap, head: &Head, task: Task) -> Vec<Vec<f64>> {
    let area = f.area() as f64;
    let classes = match task {
        Task::Multiclass => head.rows,
        Task::Binary => 2,
    };
    (0..classes as i64)
        .map(|c| {
            let map = autograd_map(f, head, |z| match task {
                Task::Binary if c == 1 => -z.get(0),
                _ => z.get(c),
            });
            map.into_iter().map(|v| v.max(0.0) / area).collect()
        })
        .collect()
}

fn check(f: &FeatureMap, head: &Head, task: Task) {
    let maps = class_maps(f, head, task);
    let reference = autograd_gradcam(f, head, task);
    assert_eq!(maps.classes, reference.len());
    let area = f.area() as f64;
    for (c, r) in reference.iter().enumerate() {
        let peak = r.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (ours, theirs) in maps.map(c).iter().zip(r) {
            // Grad-CAM = ReLU(M_c) / (h*w): absolute 1e-5 as the issue asks, and
            // relative 1e-5 of the map's peak, which is the stricter of the two here.
            let g = f64::from(ours.max(0.0)) / area;
            assert!((g - theirs).abs() < 1e-5, "class {c}: {g} vs {theirs}");
            assert!(
                (g - theirs).abs() <= 1e-5 * peak + 1e-12,
                "class {c}: {g} vs {theirs} (peak {peak})"
            );
        }
    }
}

fn random_head(rows: usize, channels: usize, scale: f32, seed: u32) -> Head {
    let v = |i: usize| ((i as f32 * 12.9898 + seed as f32 * 78.233).sin() * 43758.547).fract();
    Head {
        rows,
        channels,
        weight: (0..rows * channels).map(|i| (v(i) - 0.5) * scale).collect(),
        bias: (0..rows).map(|i| v(i + 7) - 0.5).collect(),
    }
}

#[test]
fn exact_cam_equals_autograd_gradcam_on_real_backbone_features() {
    for classes in [4u32, 2] {
        let bundle = common::tiny_bundle(classes);
        let model = Model::load(&bundle, &InferConfig::default()).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        for img in common::synth_images(tmp.path(), 2, 1024, 768) {
            let p = model.prepare(&std::fs::read(img).unwrap()).unwrap();
            let f = model.features(&[&p]).unwrap().remove(0);
            let task = model.manifest().task;
            check(&f, &model.bundle.head, task);
            let strong = random_head(model.bundle.head.rows, f.channels, 2.0, classes);
            check(&f, &strong, task);
        }
    }
}

#[test]
fn exact_cam_equals_autograd_gradcam_for_densenet161_sized_features() {
    // 2208 x 18 x 25: DenseNet-161's post-ReLU map for a 600 x 800 input.
    let (k, h, w) = (2208, 18, 25);
    let data = (0..k * h * w)
        .map(|i| (((i as f32) * 0.618).sin() * 3.0).max(0.0))
        .collect();
    let f = FeatureMap {
        channels: k,
        height: h,
        width: w,
        data,
    };
    check(&f, &random_head(4, k, 0.1, 1), Task::Multiclass);
    check(&f, &random_head(1, k, 0.1, 2), Task::Binary);
    // The identity behind it: mean(M_c) + b_c = z_c.
    let head = random_head(4, k, 0.1, 3);
    let z = head.logits(&f.global_average_pool());
    let maps = class_maps(&f, &head, Task::Multiclass);
    for (c, zc) in z.iter().enumerate() {
        let mean = maps.map(c).iter().map(|v| f64::from(*v)).sum::<f64>() / (h * w) as f64;
        assert!((mean + f64::from(head.bias[c]) - f64::from(*zc)).abs() < 1e-4);
    }
}

/// The un-clipped map of `target(z)` by autograd: `sum_k alpha_k A_k` with
/// `alpha_k = mean_ij d target / dA_kij`, times `h*w` (the module's logit units).
fn autograd_map(f: &FeatureMap, head: &Head, target: impl Fn(&Tensor) -> Tensor) -> Vec<f64> {
    let (k, h, w) = (f.channels as i64, f.height as i64, f.width as i64);
    let a = Tensor::from_slice(&f.data)
        .to_kind(Kind::Double)
        .reshape([k, h, w])
        .set_requires_grad(true);
    let wt = Tensor::from_slice(&head.weight)
        .to_kind(Kind::Double)
        .reshape([head.rows as i64, k]);
    let b = Tensor::from_slice(&head.bias).to_kind(Kind::Double);
    let z = wt.matmul(&a.mean_dim([1i64, 2].as_slice(), false, Kind::Double)) + b;
    let t = target(&z);
    let grad = Tensor::run_backward(&[t], &[&a], false, false).remove(0);
    let alpha = grad.mean_dim([1i64, 2].as_slice(), true, Kind::Double);
    let cam = (alpha * &a).sum_dim_intlist([0i64].as_slice(), false, Kind::Double) * (h * w) as f64;
    Vec::<f64>::try_from(&cam.reshape([-1])).unwrap()
}

/// Class-contrastive maps are Grad-CAM of `z_c - mean_j z_j` (the logit against
/// the classes' average) by autograd, un-clipped, within 1e-5 of the map's
/// peak; and the head with its mean row subtracted gives the same
/// probabilities (1e-6).
#[test]
fn contrastive_maps_equal_autograd_of_the_logit_against_the_mean() {
    let bundle = common::tiny_bundle(4);
    let model = Model::load(&bundle, &InferConfig::default()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for img in common::synth_images(tmp.path(), 2, 1024, 768) {
        let p = model.prepare(&std::fs::read(img).unwrap()).unwrap();
        let f = model.features(&[&p]).unwrap().remove(0);
        for head in [
            model.bundle.head.clone(),
            random_head(4, f.channels, 2.0, 5),
        ] {
            let ours = class_maps(&f, &head, Task::Multiclass).contrastive();
            for c in 0..4i64 {
                let theirs = autograd_map(&f, &head, |z| z.get(c) - z.mean(Kind::Double));
                let peak = theirs.iter().fold(0f64, |m, v| m.max(v.abs()));
                for (a, b) in ours.map(c as usize).iter().zip(&theirs) {
                    assert!(
                        (f64::from(*a) - b).abs() <= 1e-5 * peak + 1e-9,
                        "class {c}: {a} vs {b} (peak {peak})"
                    );
                }
            }
            // Softmax is unchanged by the centring.
            let mut centred = head.clone();
            for k in 0..head.channels {
                let mean = (0..4)
                    .map(|r| head.weight[r * head.channels + k])
                    .sum::<f32>()
                    / 4.0;
                for r in 0..4 {
                    centred.weight[r * head.channels + k] -= mean;
                }
            }
            let pooled = f.global_average_pool();
            let softmax = |z: Vec<f32>| {
                let m = z.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f64> = z.iter().map(|v| f64::from(v - m).exp()).collect();
                let s: f64 = e.iter().sum();
                e.into_iter().map(|v| v / s).collect::<Vec<_>>()
            };
            let (p, q) = (
                softmax(head.logits(&pooled)),
                softmax(centred.logits(&pooled)),
            );
            for (a, b) in p.iter().zip(&q) {
                assert!((a - b).abs() < 1e-6, "{a} vs {b}");
            }
        }
    }
}
