//! amqps:// and https:// with a private CA: a worker reaches RabbitMQ and Garage
//! only through TLS proxies whose certificates a test CA signed, trusting that
//! CA through `--amqp-ca-file` and `--s3-ca-file`. Without the CA files the same
//! worker cannot start and says why.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use cinflow::result::ImageStatus;
use common::tls::TlsProxy;
use common::worker::Fixture;

fn port_of(url: &str, default: u16) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or(default)
}

#[test]
fn a_worker_talks_tls_to_the_broker_and_s3_with_a_private_ca() {
    let fx = Fixture::new("tls", 4);
    let certs = fx.tmp.path().join("certs");
    let amqp_port = port_of(fx.amqp.url.trim_end_matches("/%2f"), 5672);
    let s3_port = port_of(fx.s3.endpoint.as_deref().unwrap(), 3900);
    let broker = TlsProxy::start(&certs, SocketAddr::from(([127, 0, 0, 1], amqp_port)));
    let s3 = TlsProxy::start(&certs, SocketAddr::from(([127, 0, 0, 1], s3_port)));
    let amqps = format!("amqps://guest:guest@localhost:{}/%2f", broker.port);
    let https = format!("https://localhost:{}", s3.port);
    let ca = broker.ca_file.to_str().unwrap().to_string();

    // Without the CA the certificates are not trusted: the worker cannot load its model.
    let mut untrusting = fx.spawn(
        "infer",
        &[
            ("CINFLOW_AMQP_URL", &amqps),
            ("CINFLOW_S3_ENDPOINT", &https),
            ("CINFLOW_RETRY_FOR_S", "1"),
        ],
    );
    let status = untrusting
        .wait_exit(Duration::from_secs(60))
        .expect("the worker gives up");
    assert!(!status.success());
    let log = untrusting.log();
    assert!(log.contains("cannot load model"), "{log}");
    assert!(log.contains("UnknownIssuer"), "the reason is named: {log}");

    let w = fx.spawn(
        "infer",
        &[
            ("CINFLOW_AMQP_URL", &amqps),
            ("CINFLOW_AMQP_CA_FILE", &ca),
            ("CINFLOW_S3_ENDPOINT", &https),
            ("CINFLOW_S3_CA_FILE", &ca),
        ],
    );
    let img = fx.images(1, 640, 480);
    fx.publish(&fx.job("over-tls", &img));
    let r = fx.wait_result("over-tls", "v1", &w);
    assert_eq!(r.status, ImageStatus::Ok);
    assert!(r.result_uri.is_some());
    let events = fx.events();
    assert_eq!(events.len(), 1, "the event went out over amqps: {events:?}");
}
