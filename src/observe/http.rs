//! The worker's small HTTP server: `/metrics` (Prometheus), `/healthz` (the
//! process answers and its jobs make progress: 503 when jobs are in flight and
//! none moved for `--stall-limit-s`) and `/readyz` (model loaded and warmed
//! up, broker connected). It runs on the async runtime beside the consumer; its handlers
//! only read atomics and encode counters, so they answer while jobs run.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::{health, metrics};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `addr` and serves until the process ends; returns the bound address
/// (`127.0.0.1:0` picks a free port).
pub async fn serve(addr: &str) -> anyhow::Result<SocketAddr> {
    let local = crate::listen::serve(addr, "--metrics-addr", "metrics", |stream, _| async move {
        let svc = hyper::service::service_fn(|req| async move { Ok::<_, Infallible>(route(&req)) });
        if let Err(e) = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), svc)
            .await
        {
            tracing::debug!(error = %e, "metrics server: connection ended");
        }
    })
    .await?;
    tracing::info!(addr = %local, "serving /metrics, /healthz and /readyz");
    Ok(local)
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

fn route(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => respond(StatusCode::OK, OPENMETRICS, metrics().encode()),
        "/healthz" => match health().stalled() {
            None => respond(StatusCode::OK, "text/plain", "ok\n".into()),
            Some(s) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!(
                    "stalled: {} job(s) in flight and no progress for {:.0} s (--stall-limit-s)\n",
                    s.jobs, s.for_s
                ),
            ),
        },
        "/readyz" => {
            let h = health();
            let body = serde_json::json!({
                "ready": h.ready(),
                "model_loaded": h.model_loaded(),
                "broker_connected": h.broker_connected(),
            })
            .to_string();
            let status = if h.ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            respond(status, "application/json", body)
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}
