//! The S3 object store against the real Garage server that `make test` starts:
//! round trips, the size cap, error classification, and the model registry and
//! feature cache on S3.

mod common;

use cinflow::retry::Transient;

use std::sync::Arc;

use cinflow::model::Registry;
use cinflow::storage::{ObjectStore, S3Config, S3Store, StoreError};

#[test]
fn round_trip_list_limit_and_delete() {
    let s = S3Store::new(&common::s3_config()).unwrap();
    let p = common::unique_prefix("rt");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    s.put(&format!("{p}/a/one.bin"), &data, "application/octet-stream")
        .unwrap();
    s.put(&format!("{p}/a/two.json"), b"{}", "application/json")
        .unwrap();
    s.put(&format!("{p}/b.txt"), b"b", "text/plain").unwrap();
    assert_eq!(s.get(&format!("{p}/a/one.bin")).unwrap(), data);
    assert_eq!(
        s.list(&format!("{p}/a/")).unwrap(),
        vec![format!("{p}/a/one.bin"), format!("{p}/a/two.json")]
    );
    assert!(s.exists(&format!("{p}/b.txt")).unwrap());
    assert!(!s.exists(&format!("{p}/nothing")).unwrap());
    match s.get_limited(&format!("{p}/a/one.bin"), 99_999) {
        Err(StoreError::TooLarge { size, limit, .. }) => {
            assert_eq!((size, limit), (100_000, 99_999))
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let e = s.get(&format!("{p}/missing.jpg")).unwrap_err();
    assert!(e.is_not_found() && !e.is_transient(), "{e}");
    assert!(e.to_string().contains("missing.jpg"), "{e}");
    s.delete(&format!("{p}/b.txt")).unwrap();
    assert!(!s.exists(&format!("{p}/b.txt")).unwrap());
    assert!(s.get("../escape").is_err());
}

#[test]
fn failures_are_classified_transient_or_permanent() {
    // No such bucket: permanent, with the server's reason.
    let mut cfg = common::s3_config();
    cfg.bucket = "cinflow-no-such-bucket".into();
    let e = S3Store::new(&cfg).unwrap().get("x").unwrap_err();
    assert!(!e.is_transient(), "{e:?}");
    assert!(
        e.to_string().contains("NoSuchBucket") || e.is_not_found(),
        "{e}"
    );

    // Nothing listening: transient, retried, then reported.
    let cfg = S3Config {
        endpoint: Some("http://127.0.0.1:9".into()),
        attempts: 2,
        backoff_ms: 10,
        timeout_s: 2,
        ..common::s3_config()
    };
    let t = std::time::Instant::now();
    let e = S3Store::new(&cfg).unwrap().get("x").unwrap_err();
    assert!(e.is_transient(), "{e:?}");
    assert!(matches!(e, StoreError::Unavailable { .. }), "{e:?}");
    assert!(t.elapsed() >= std::time::Duration::from_millis(10));
}

#[test]
fn registry_and_feature_cache_work_on_s3() {
    let s: Arc<dyn ObjectStore> = Arc::new(S3Store::new(&common::s3_config()).unwrap());
    let name = common::unique_prefix("model");
    let reg = Registry::new(s.clone(), &name).unwrap();
    let bundle = common::tiny_bundle(4);
    let version = cinflow::model::Bundle::load(&bundle)
        .unwrap()
        .manifest
        .version;
    reg.publish(&bundle).unwrap();
    assert_eq!(reg.versions().unwrap(), vec![version.clone()]);
    assert!(matches!(
        reg.publish(&bundle),
        Err(cinflow::model::RegistryError::Exists { .. })
    ));
    reg.set_alias("current", &version, "test").unwrap();
    assert_eq!(reg.alias("current").unwrap().unwrap().version, version);
    let dir = tempfile::tempdir().unwrap();
    let fetched = reg.fetch(&version, &dir.path().join("b")).unwrap();
    assert_eq!(
        fetched.backbone_sha256(),
        cinflow::model::Bundle::load(&bundle)
            .unwrap()
            .backbone_sha256()
    );

    // The feature cache of training on S3: a second extraction reads every image back.
    let model = cinflow::pipeline::Model::load(&bundle, &Default::default()).unwrap();
    let imgs = common::synth_images(&dir.path().join("img"), 2, 320, 240);
    let rows: Vec<cinflow::train::LabelRow> = imgs
        .iter()
        .enumerate()
        .map(|(i, p)| cinflow::train::LabelRow {
            line: i + 2,
            path: p.clone(),
            label: "CIN3".into(),
            patient_id: format!("P{i}"),
            slide_id: None,
            signed_out: None,
        })
        .collect();
    let cache = cinflow::train::FeatureCache::new(s.clone(), &common::unique_prefix("cache"));
    let (a, st) = cinflow::train::extract(&model, &rows, "labels", &cache, None).unwrap();
    assert_eq!((st.computed, st.cached), (2, 0));
    let (b, st) = cinflow::train::extract(&model, &rows, "labels", &cache, None).unwrap();
    assert_eq!((st.computed, st.cached), (0, 2));
    assert_eq!(a, b);
    assert!(cache.uri().starts_with("s3://"));
}

/// A large object (a DenseNet-161 backbone is about 100 MB) goes up in parts,
/// each retried by itself, with progress per part; what comes back is the same
/// bytes, with the whole object's sha256 as metadata, and a download reports
/// every byte as it arrives.
#[test]
fn large_objects_go_up_in_parts_with_progress() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let s = S3Store::new(&common::s3_config()).unwrap();
    let key = format!("{}/big.onnx", common::unique_prefix("multipart"));
    let size = cinflow::storage::MULTIPART_OVER + cinflow::storage::PART_BYTES + 12_345;
    let data: Vec<u8> = (0..size as u32).map(|i| (i * 31 % 253) as u8).collect();
    let sent = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let (s2, c2) = (sent.clone(), calls.clone());
    s.put_reporting(&key, &data, "application/octet-stream", &move |n| {
        s2.fetch_add(n, Ordering::Relaxed);
        c2.fetch_add(1, Ordering::Relaxed);
    })
    .unwrap();
    assert_eq!(sent.load(Ordering::Relaxed), size as u64);
    let parts = size.div_ceil(cinflow::storage::PART_BYTES) as u64;
    assert_eq!(calls.load(Ordering::Relaxed), parts, "one report per part");
    let got = Arc::new(AtomicU64::new(0));
    let g2 = got.clone();
    let back = s
        .get_reporting(&key, &move |n| {
            g2.fetch_add(n, Ordering::Relaxed);
        })
        .unwrap();
    assert!(back == data, "the object came back different");
    assert_eq!(got.load(Ordering::Relaxed), size as u64);

    // The sha256 metadata is the whole object's, as for a single PUT.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let head = rt.block_on(async {
        let cfg = common::s3_config();
        let client = cinflow::storage::S3Client::connect(&cfg).await.unwrap();
        client.head_metadata(&cfg.bucket, &key).await.unwrap()
    });
    assert_eq!(
        head.get("sha256").map(String::as_str),
        Some(cinflow::hashing::sha256_hex(&data).as_str())
    );
}
