//! S3 (and S3-compatible servers such as Garage or MinIO) behind [`ObjectStore`].
//!
//! aws-sdk-s3 with a custom endpoint, path-style addressing and region;
//! credentials come from the standard AWS chain (environment, profile, web
//! identity) and are never logged. The SDK's own retries are off: every
//! operation is retried here with exponential backoff when [`classify`] says the
//! failure is transient (throttling, 5xx, timeouts, connection errors), so the
//! policy lives in one place.
//!
//! The store owns a small tokio runtime and blocks on it, like every
//! [`ObjectStore`]: call it from blocking threads (`spawn_blocking`), never from
//! inside an async task.

use std::time::Duration;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;

use super::{check_key, ObjectStore, StoreError};

/// Where the object store is and how hard to try.
#[derive(Debug, Clone, clap::Args)]
pub struct S3Config {
    /// S3 endpoint URL for S3-compatible servers (empty: AWS's own endpoints).
    #[arg(long = "s3-endpoint", env = "CINFLOW_S3_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Region (Garage's default is `garage`).
    #[arg(long = "s3-region", env = "AWS_REGION", default_value = "us-east-1")]
    pub region: String,
    /// Bucket holding images, results, feature caches and models.
    #[arg(
        long = "s3-bucket",
        env = "CINFLOW_S3_BUCKET",
        default_value = "cinflow"
    )]
    pub bucket: String,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most S3-compatible servers.
    #[arg(
        long = "s3-force-path-style",
        env = "CINFLOW_S3_FORCE_PATH_STYLE",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub force_path_style: bool,
    /// Attempts per operation when failures are transient.
    #[arg(long = "s3-attempts", env = "CINFLOW_S3_ATTEMPTS", default_value_t = 5)]
    pub attempts: u32,
    /// First backoff in milliseconds (doubled per attempt, capped at 10 s).
    #[arg(
        long = "s3-backoff-ms",
        env = "CINFLOW_S3_BACKOFF_MS",
        default_value_t = 200
    )]
    pub backoff_ms: u64,
    /// Timeout of one operation attempt, in seconds.
    #[arg(
        long = "s3-timeout-s",
        env = "CINFLOW_S3_TIMEOUT_S",
        default_value_t = 30
    )]
    pub timeout_s: u64,
    /// PEM file of the CA that signed the endpoint's certificate (https:// with a
    /// private CA); added to the system's trusted roots.
    #[arg(id = "s3_ca_file", long = "s3-ca-file", env = "CINFLOW_S3_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
}

/// A bucket as an object store.
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    endpoint: String,
    cfg: S3Config,
    /// Always `Some` until dropped (see `Drop`).
    rt: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

/// What one failed S3 call means: not found, transient (throttling, 5xx,
/// timeouts, connection errors) or permanent.
pub fn classify<E: ProvideErrorMetadata + std::error::Error + 'static>(
    uri: &str,
    err: &SdkError<E, HttpResponse>,
) -> StoreError {
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = match err {
        SdkError::ServiceError(s) => s.err().code(),
        _ => None,
    };
    let detail = match err {
        SdkError::ServiceError(s) => format!(
            "{}: {}",
            code.unwrap_or("error"),
            s.err().message().unwrap_or("no message")
        ),
        other => format!("{}", aws_sdk_s3::error::DisplayErrorContext(other)),
    };
    if matches!(code, Some("NoSuchKey" | "NotFound")) || status == Some(404) {
        return StoreError::NotFound {
            uri: uri.to_string(),
        };
    }
    let transient = matches!(
        err,
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_)
    ) || status.is_some_and(|s| s == 429 || s >= 500)
        || matches!(
            code,
            Some(
                "SlowDown"
                    | "Throttling"
                    | "ThrottlingException"
                    | "RequestTimeout"
                    | "InternalError"
                    | "ServiceUnavailable"
            )
        );
    let uri = uri.to_string();
    if transient {
        StoreError::Unavailable { uri, detail }
    } else {
        StoreError::Backend { uri, detail }
    }
}

/// An HTTPS client that trusts the system roots plus the CA in `ca` (PEM).
fn https_client_trusting(
    ca: &std::path::Path,
) -> Result<aws_sdk_s3::config::SharedHttpClient, StoreError> {
    use aws_smithy_http_client::tls;
    let uri = format!("CA file {}", ca.display());
    let pem = std::fs::read(ca).map_err(|source| StoreError::Io {
        uri: uri.clone(),
        source,
    })?;
    let ctx = tls::TlsContext::builder()
        .with_trust_store(
            tls::TrustStore::default()
                .with_native_roots(true)
                .with_pem_certificate(pem),
        )
        .build()
        .map_err(|e| StoreError::Backend {
            uri,
            detail: e.to_string(),
        })?;
    Ok(aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::AwsLc,
        ))
        .tls_context(ctx)
        .build_https())
}

impl S3Store {
    /// Connects (lazily: the first request opens the connection).
    pub fn new(cfg: &S3Config) -> Result<S3Store, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cinflow-s3")
            .enable_all()
            .build()
            .map_err(|source| StoreError::Io {
                uri: "s3 runtime".into(),
                source,
            })?;
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(cfg.region.clone()));
        if let Some(ca) = &cfg.ca_file {
            loader = loader.http_client(https_client_trusting(ca)?);
        }
        let shared = rt.block_on(loader.load());
        let mut b = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(cfg.force_path_style)
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(Duration::from_secs(cfg.timeout_s))
                    .connect_timeout(Duration::from_secs(5))
                    .build(),
            );
        if let Some(e) = cfg.endpoint.as_ref().filter(|e| !e.is_empty()) {
            b = b.endpoint_url(e);
        }
        Ok(S3Store {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            bucket: cfg.bucket.clone(),
            endpoint: cfg.endpoint.clone().unwrap_or_else(|| "aws".into()),
            cfg: cfg.clone(),
            rt: Some(rt),
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Runs `op` until it succeeds, fails permanently, or runs out of attempts.
    fn retry<T, F, Fut>(&self, key: &str, what: &str, op: F) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut delay = Duration::from_millis(self.cfg.backoff_ms);
        let mut attempt = 1;
        loop {
            match self.rt.as_ref().expect("runtime until drop").block_on(op()) {
                Err(e) if e.is_retriable() && attempt < self.cfg.attempts.max(1) => {
                    tracing::warn!(key, attempt, error = %e, "S3 {what} failed; retrying in {delay:?}");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(10));
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

impl Drop for S3Store {
    /// The last reference may go away inside an async task (a worker giving up
    /// at start-up): shut the store's runtime down without blocking there.
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl ObjectStore for S3Store {
    fn get_limited(&self, key: &str, limit: u64) -> Result<Vec<u8>, StoreError> {
        check_key(key)?;
        let uri = self.uri(key);
        self.retry(key, "get", || async {
            let out = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| classify(&uri, &e))?;
            let declared = out.content_length().unwrap_or(0).max(0) as u64;
            if declared > limit {
                return Err(StoreError::TooLarge {
                    uri: uri.clone(),
                    size: declared,
                    limit,
                });
            }
            // Stream the body and stop at the cap, whatever the header said.
            let mut body = out.body;
            let mut bytes = Vec::with_capacity(declared as usize);
            while let Some(chunk) = body.try_next().await.map_err(|e| StoreError::Unavailable {
                uri: uri.clone(),
                detail: format!("body: {e}"),
            })? {
                bytes.extend_from_slice(&chunk);
                if bytes.len() as u64 > limit {
                    return Err(StoreError::TooLarge {
                        uri: uri.clone(),
                        size: bytes.len() as u64,
                        limit,
                    });
                }
            }
            Ok(bytes)
        })
    }

    fn put(&self, key: &str, bytes: &[u8], content_type: &str) -> Result<(), StoreError> {
        check_key(key)?;
        let uri = self.uri(key);
        let sha = crate::hashing::sha256_hex(bytes);
        self.retry(key, "put", || async {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .content_type(content_type)
                .metadata("sha256", &sha)
                .body(ByteStream::from(bytes.to_vec()))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify(&uri, &e))
        })
    }

    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        check_key(key)?;
        let uri = self.uri(key);
        self.retry(key, "head", || async {
            match self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
            {
                Ok(_) => Ok(true),
                Err(e) => match classify(&uri, &e) {
                    StoreError::NotFound { .. } => Ok(false),
                    other => Err(other),
                },
            }
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let uri = self.uri(prefix);
        self.retry(prefix, "list", || async {
            let mut keys = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let out = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(prefix)
                    .set_continuation_token(token.clone())
                    .send()
                    .await
                    .map_err(|e| classify(&uri, &e))?;
                keys.extend(
                    out.contents()
                        .iter()
                        .filter_map(|o| o.key().map(str::to_string)),
                );
                match out.next_continuation_token() {
                    Some(t) if out.is_truncated().unwrap_or(false) => token = Some(t.to_string()),
                    _ => break,
                }
            }
            keys.sort();
            Ok(keys)
        })
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        check_key(key)?;
        let uri = self.uri(key);
        self.retry(key, "delete", || async {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify(&uri, &e))
        })
    }

    fn uri(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_missing_ca_file_is_named() {
        let cfg = super::S3Config {
            endpoint: Some("https://s3.lab.internal".into()),
            region: "us-east-1".into(),
            bucket: "b".into(),
            force_path_style: true,
            attempts: 1,
            backoff_ms: 1,
            timeout_s: 1,
            ca_file: Some("/nonexistent/ca.pem".into()),
        };
        let e = super::S3Store::new(&cfg).unwrap_err().to_string();
        assert!(e.contains("CA file /nonexistent/ca.pem"), "{e}");
    }
}
