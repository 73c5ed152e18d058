//! The inference worker's serving engine against the real RabbitMQ and Garage:
//! images of two jobs graded in one backbone call with the same grades as
//! alone; a failed GET retried for that object only; a failed PUT sent again
//! without rendering again. Faults come from a proxy in front of Garage that
//! counts every request (tests/common/faulty_s3.rs).

mod common;

use cinflow::pipeline::BatchInfo;
use cinflow::result::{ImageStatus, ResultRecord};
use common::faulty_s3::FaultyS3;
use common::http::{free_port, get, sample};
use common::worker::Fixture;

/// Probabilities of `r`'s images against local-mode grading of the same bytes
/// with one image per backbone call, within `tol`.
fn same_as_alone(fx: &Fixture, r: &ResultRecord, tol: f32) {
    let alone = fx.grade_locally(r, 1);
    for (img, want) in r.images.iter().zip(&alone) {
        assert_eq!(want.batch.unwrap().images, 1);
        let (got, want) = (
            img.probabilities.as_ref().unwrap(),
            want.probabilities.as_ref().unwrap(),
        );
        for (c, p) in want {
            assert!(
                (got[c] - p).abs() <= tol,
                "{c}: batched {} vs alone {p}",
                got[c]
            );
        }
    }
}

#[test]
fn two_one_image_jobs_share_one_backbone_call() {
    let fx = Fixture::new("xbatch", 4);
    let imgs = fx.images(2, 640, 480);
    // Both jobs wait in the queue before the worker starts; a long batch wait
    // lets the second image join the first one's call.
    fx.publish(&fx.job("first", &imgs[..1]));
    fx.publish(&fx.job("second", &imgs[1..]));
    let port = free_port();
    let w = fx.spawn(
        "infer",
        &[
            ("CINFLOW_MAX_BATCH", "2"),
            ("CINFLOW_BATCH_WAIT_MS", "5000"),
            ("CINFLOW_CONCURRENCY", "2"),
            ("CINFLOW_METRICS_ADDR", &format!("127.0.0.1:{port}")),
        ],
    );
    for job in ["first", "second"] {
        let r = fx.wait_result(job, "v1", &w);
        assert_eq!(r.status, ImageStatus::Ok, "{r:?}");
        assert_eq!(
            r.images[0].batch,
            Some(BatchInfo { images: 2, jobs: 2 }),
            "{job}"
        );
        same_as_alone(&fx, &r, 1e-6);
    }
    // One backbone call of two images besides the warm-up (which is not a batch).
    let m = get(port, "/metrics").unwrap().1;
    assert_eq!(
        sample(&m, "cinflow_backbone_batch_images_count"),
        1.0,
        "{m}"
    );
    assert_eq!(sample(&m, "cinflow_backbone_batch_images_sum"), 2.0, "{m}");
}

/// A worker whose S3 traffic goes through `proxy`, with its metrics on `port`.
fn spawn_behind(fx: &Fixture, proxy: &FaultyS3, port: u16) -> common::worker::Worker {
    fx.spawn(
        "infer",
        &[
            ("CINFLOW_S3_ENDPOINT", &proxy.endpoint()),
            ("CINFLOW_METRICS_ADDR", &format!("127.0.0.1:{port}")),
        ],
    )
}

#[test]
fn a_failed_get_is_retried_for_that_object_only() {
    let fx = Fixture::new("getfail", 4);
    let imgs = fx.images(3, 640, 480);
    let proxy = FaultyS3::start(fx.s3.endpoint.as_deref().unwrap());
    let key = |uri: &str| {
        uri.split_once(&format!("{}/", fx.s3.bucket))
            .unwrap()
            .1
            .to_string()
    };
    // The first GET of the second image answers 503 SlowDown.
    proxy.fail("GET", &key(&imgs[1]), 1, 503);
    let port = free_port();
    let w = spawn_behind(&fx, &proxy, port);
    fx.publish(&fx.job("slide", &imgs));
    let r = fx.wait_result("slide", "v1", &w);
    assert_eq!(r.status, ImageStatus::Ok, "{r:?}");
    assert_eq!(
        proxy.count("GET", &key(&imgs[1])),
        2,
        "{:#?}",
        proxy.requests()
    );
    for other in [&imgs[0], &imgs[2]] {
        assert_eq!(
            proxy.count("GET", &key(other)),
            1,
            "{:#?}",
            proxy.requests()
        );
    }
    let m = get(port, "/metrics").unwrap().1;
    assert_eq!(
        sample(&m, "cinflow_retries_total{step=\"fetch\"}"),
        1.0,
        "{m}"
    );
    // Each image was rendered and uploaded once.
    assert_eq!(sample(&m, "cinflow_renders_total"), 3.0, "{m}");
}

#[test]
fn a_failed_put_is_sent_again_without_rendering_again() {
    let fx = Fixture::new("putfail", 4);
    let imgs = fx.images(1, 640, 480);
    let proxy = FaultyS3::start(fx.s3.endpoint.as_deref().unwrap());
    // The first two PUTs of the overlay fail (500, then 503).
    proxy.fail("PUT", "/images/000/heatmap-", 1, 500);
    proxy.fail("PUT", "/images/000/heatmap-", 1, 503);
    let port = free_port();
    let w = spawn_behind(&fx, &proxy, port);
    fx.publish(&fx.job("slide", &imgs));
    let r = fx.wait_result("slide", "v1", &w);
    assert_eq!(r.status, ImageStatus::Ok, "{r:?}");
    assert_eq!(
        proxy.count("PUT", "/images/000/heatmap-"),
        3,
        "{:#?}",
        proxy.requests()
    );
    // The other artifacts went up once each.
    assert_eq!(proxy.count("PUT", "/images/000/preprocessed.jpg"), 1);
    assert_eq!(proxy.count("PUT", "/images/000/cam.npy"), 1);
    let m = get(port, "/metrics").unwrap().1;
    assert_eq!(sample(&m, "cinflow_renders_total"), 1.0, "{m}");
    assert_eq!(
        sample(&m, "cinflow_retries_total{step=\"put\"}"),
        2.0,
        "{m}"
    );
    // The stored overlay is a whole JPEG.
    let overlay = &r.images[0].heatmaps[0].overlay;
    let key = overlay.split_once(&format!("{}/", fx.s3.bucket)).unwrap().1;
    let jpg = cinflow::storage::ObjectStore::get(&*fx.store, key).unwrap();
    assert!(image::load_from_memory(&jpg).is_ok());
}
