//! The fault-injecting S3 proxy of tests/common/faulty_s3.rs in front of the real
//! Garage server: objects of every size round-trip through it byte for byte
//! (SigV4 signatures stay valid), it counts requests per object, and the errors
//! it injects are seen by the S3 store as transient and retried for that object
//! only.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use cinflow::storage::{ObjectStore, S3Config, S3Store};
use common::faulty_s3::FaultyS3;

fn proxy() -> FaultyS3 {
    FaultyS3::start(&common::s3_config().endpoint.unwrap())
}

/// An S3 store that talks to Garage through `proxy`, trying `attempts` times.
fn store(proxy: &FaultyS3, attempts: u32) -> S3Store {
    S3Store::new(&S3Config {
        endpoint: Some(proxy.endpoint()),
        attempts,
        backoff_ms: 10,
        ..common::s3_config()
    })
    .unwrap()
}

fn bytes(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

#[test]
fn objects_round_trip_through_the_proxy_and_are_counted() {
    let proxy = proxy();
    let s = store(&proxy, 1);
    let p = common::unique_prefix("proxy");
    let small = b"small object".to_vec();
    let big = bytes(6 << 20, 1);
    let objects = [
        (format!("{p}/small.txt"), small),
        (format!("{p}/big.bin"), big),
        (format!("{p}/empty"), Vec::new()),
        (format!("{p}/with space+plus.json"), b"{}".to_vec()),
    ];
    for (key, data) in &objects {
        s.put(key, data, "application/octet-stream").unwrap();
    }
    for (key, data) in &objects {
        assert!(s.get(key).unwrap() == *data, "{key} differs");
    }
    // Once more: the same kept-alive connections carry further requests.
    assert!(s.get(&objects[1].0).unwrap() == objects[1].1);
    assert!(s.exists(&objects[0].0).unwrap());
    assert!(!s.exists(&format!("{p}/missing")).unwrap());
    let e = s.get(&format!("{p}/missing")).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let mut keys: Vec<String> = objects.iter().map(|o| o.0.clone()).collect();
    keys.sort();
    assert_eq!(s.list(&format!("{p}/")).unwrap(), keys);
    s.delete(&objects[0].0).unwrap();
    assert!(!s.exists(&objects[0].0).unwrap());

    assert_eq!(proxy.count("PUT", &format!("{p}/")), 4);
    assert_eq!(proxy.count("PUT", "/small.txt"), 1);
    assert_eq!(proxy.count("GET", "/big.bin"), 2);
    assert_eq!(proxy.count("GET", "/small.txt"), 1);
    // Keys are matched percent-decoded.
    assert_eq!(proxy.count("GET", "/with space+plus.json"), 1);
    assert_eq!(proxy.count("HEAD", "/missing"), 1);
    assert_eq!(proxy.count("HEAD", &format!("{p}/")), 3);
    assert_eq!(proxy.count("DELETE", "/small.txt"), 1);
    assert_eq!(proxy.count("GET", "/missing"), 1);

    let requests = proxy.requests();
    assert_eq!(requests.len(), 4 + 5 + 3 + 1 + 1 + 1, "{requests:?}");
    for (method, target, status) in &requests {
        let want: &[u16] = if target.contains("/missing") {
            &[404]
        } else if method == "HEAD" && target.contains("/small.txt") {
            &[200, 404] // before and after the delete
        } else {
            &[200, 204]
        };
        assert!(want.contains(status), "{method} {target}: {status}");
    }
    assert!(requests
        .iter()
        .any(|(m, t, _)| m == "GET" && t.contains("list-type=2")));
}

#[test]
fn a_failed_get_is_retried_for_that_object_only() {
    let proxy = proxy();
    let s = store(&proxy, 3);
    let p = common::unique_prefix("proxy-get");
    let images: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("{p}/img{i}.jpg"), bytes(200_000 + i, i as u32)))
        .collect();
    for (key, data) in &images {
        s.put(key, data, "image/jpeg").unwrap();
    }
    proxy.fail("GET", "/img1.jpg", 1, 503);
    for (key, data) in &images {
        assert!(s.get(key).unwrap() == *data, "{key} differs");
    }
    assert_eq!(proxy.count("GET", "/img0.jpg"), 1);
    assert_eq!(proxy.count("GET", "/img1.jpg"), 2);
    assert_eq!(proxy.count("GET", "/img2.jpg"), 1);
    let img1: Vec<u16> = proxy
        .requests()
        .into_iter()
        .filter(|(m, t, _)| m == "GET" && t.contains("/img1.jpg"))
        .map(|r| r.2)
        .collect();
    assert_eq!(img1, [503, 200]);

    // A 500 is transient too; the fault is used up after `times`.
    proxy.fail("GET", "/img2.jpg", 2, 500);
    assert!(s.get(&images[2].0).unwrap() == images[2].1);
    assert_eq!(proxy.count("GET", "/img2.jpg"), 4);
    assert!(s.get(&images[2].0).unwrap() == images[2].1);
    assert_eq!(proxy.count("GET", "/img2.jpg"), 5);
}

#[test]
fn a_failed_put_is_uploaded_again() {
    let proxy = proxy();
    let s = store(&proxy, 3);
    let p = common::unique_prefix("proxy-put");
    let heatmap = bytes(3 << 20, 7);
    proxy.fail("PUT", "/heatmap.png", 1, 503);
    s.put(&format!("{p}/heatmap.png"), &heatmap, "image/png")
        .unwrap();
    s.put(
        &format!("{p}/result.json"),
        b"{\"grade\":2}",
        "application/json",
    )
    .unwrap();
    assert_eq!(proxy.count("PUT", "/heatmap.png"), 2);
    assert_eq!(proxy.count("PUT", "/result.json"), 1);
    assert!(s.get(&format!("{p}/heatmap.png")).unwrap() == heatmap);
}

#[test]
fn with_one_attempt_the_injected_failure_is_reported_retriable() {
    let proxy = proxy();
    let s = store(&proxy, 1);
    let p = common::unique_prefix("proxy-once");
    let key = format!("{p}/img.jpg");
    s.put(&key, b"jpeg", "image/jpeg").unwrap();

    proxy.fail("GET", "/img.jpg", 1, 503);
    let e = s.get(&key).unwrap_err();
    assert!(cinflow::retry::Transient::is_transient(&e), "{e:?}");
    assert!(e.to_string().contains("ServiceUnavailable"), "{e}");
    assert_eq!(s.get(&key).unwrap(), b"jpeg");
    assert_eq!(proxy.count("GET", "/img.jpg"), 2);

    // A failed PUT was never forwarded: the object is not there.
    let other = format!("{p}/other.png");
    proxy.fail("PUT", "/other.png", 1, 500);
    let e = s.put(&other, &bytes(1 << 20, 3), "image/png").unwrap_err();
    assert!(cinflow::retry::Transient::is_transient(&e), "{e:?}");
    assert!(e.to_string().contains("InternalError"), "{e}");
    assert!(!s.exists(&other).unwrap());

    // HEAD answers carry no body.
    proxy.fail("HEAD", "/img.jpg", 1, 503);
    let e = s.exists(&key).unwrap_err();
    assert!(cinflow::retry::Transient::is_transient(&e), "{e:?}");
    assert!(s.exists(&key).unwrap());
}

/// Reads one response head from `r`: (status, head text).
fn response_head(r: &mut impl BufRead) -> (u16, String) {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "closed after {head:?}");
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head)
}

fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0)
}

#[test]
fn chunked_bodies_expect_continue_and_keep_alive_are_framed() {
    // Unsigned requests: Garage refuses them, but each must get its own answer,
    // in order, on one client connection.
    let proxy = proxy();
    let port = proxy.endpoint().rsplit(':').next().unwrap().to_string();
    let bucket = common::s3_config().bucket;
    let mut conn = TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut r = BufReader::new(conn.try_clone().unwrap());
    write!(
        conn,
        "PUT /{bucket}/raw/chunked HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
    )
    .unwrap();
    let (status, _) = response_head(&mut r);
    assert_eq!(status, 100);
    conn.write_all(b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n")
        .unwrap();
    let (status, head) = response_head(&mut r);
    assert_eq!(status, 403, "{head}");
    let mut body = vec![0; content_length(&head)];
    r.read_exact(&mut body).unwrap();

    proxy.fail("PUT", "/raw/", 1, 503);
    write!(
        conn,
        "PUT /{bucket}/raw/length HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 3\r\n\r\nabc"
    )
    .unwrap();
    let (status, head) = response_head(&mut r);
    assert_eq!(status, 503, "{head}");
    let mut body = vec![0; content_length(&head)];
    r.read_exact(&mut body).unwrap();
    let body = String::from_utf8(body).unwrap();
    assert!(body.contains("<Code>ServiceUnavailable</Code>"), "{body}");

    write!(
        conn,
        "HEAD /{bucket}/raw/chunked HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let (status, head) = response_head(&mut r);
    assert_eq!(status, 403, "{head}");
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "a HEAD answer has no body");

    assert_eq!(
        proxy
            .requests()
            .into_iter()
            .map(|(m, t, s)| format!("{m} {t} {s}"))
            .collect::<Vec<_>>(),
        [
            format!("PUT /{bucket}/raw/chunked 403"),
            format!("PUT /{bucket}/raw/length 503"),
            format!("HEAD /{bucket}/raw/chunked 403"),
        ]
    );
}
