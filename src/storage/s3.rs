//! S3 (and S3-compatible servers such as Garage or MinIO).
//!
//! aws-sdk-s3 with a custom endpoint, path-style addressing and region;
//! credentials come from the standard AWS chain (environment, profile, web
//! identity) and are never logged. The SDK's own retries are off: [`classify`]
//! says whether a failure is transient (throttling, 5xx, timeouts, connection
//! errors), and [`crate::retry::RetryPolicy`] retries it, in one place.
//!
//! Two faces over one client:
//! - [`S3Client`]: async, one attempt per call, any bucket. The inference
//!   worker's fetch and put stages use it on the worker's own runtime and retry
//!   each object by itself.
//! - [`S3Store`]: one bucket behind the synchronous [`ObjectStore`] trait (the
//!   model registry, training, one-shot commands), retried per operation with
//!   `--s3-attempts`. Call it from blocking threads only. Made inside a tokio
//!   runtime it runs on that runtime; made outside one (a one-shot command, a
//!   test) it starts a small runtime of its own.

use std::time::Duration;

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;

use super::{check_key, ObjectStore, Progress, StoreError};
use crate::retry::{Limit, RetryPolicy};

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

/// Objects larger than this are uploaded in parts of [`PART_BYTES`] by
/// [`ObjectStore::put_reporting`] (each part retried by itself, progress per part).
pub const MULTIPART_OVER: usize = 16 << 20;
/// Size of one part of a multipart upload (S3 needs at least 5 MiB but the last).
pub const PART_BYTES: usize = 8 << 20;

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

/// An S3 endpoint's client: async, one attempt per call.
#[derive(Clone)]
pub struct S3Client {
    client: aws_sdk_s3::Client,
    endpoint: String,
}

impl std::fmt::Debug for S3Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Client")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// `s3://bucket/key`.
pub fn s3_uri(bucket: &str, key: &str) -> String {
    format!("s3://{bucket}/{key}")
}

impl S3Client {
    /// Connects (lazily: the first request opens the connection).
    pub async fn connect(cfg: &S3Config) -> Result<S3Client, StoreError> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(cfg.region.clone()));
        if let Some(ca) = &cfg.ca_file {
            loader = loader.http_client(https_client_trusting(ca)?);
        }
        let shared = loader.load().await;
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
        Ok(S3Client {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            endpoint: cfg.endpoint.clone().unwrap_or_else(|| "aws".into()),
        })
    }

    /// Reads a whole object, refusing ones over `limit` bytes (by the declared
    /// length, and while streaming whatever the header said).
    pub async fn get(&self, bucket: &str, key: &str, limit: u64) -> Result<Vec<u8>, StoreError> {
        self.get_reporting(bucket, key, limit, &|_| {}).await
    }

    /// [`S3Client::get`], telling `progress` the bytes of each chunk as it arrives.
    pub async fn get_reporting(
        &self,
        bucket: &str,
        key: &str,
        limit: u64,
        progress: &Progress,
    ) -> Result<Vec<u8>, StoreError> {
        check_key(key)?;
        let uri = s3_uri(bucket, key);
        let out = self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify(&uri, &e))?;
        let declared = out.content_length().unwrap_or(0).max(0) as u64;
        if declared > limit {
            return Err(StoreError::TooLarge {
                uri,
                size: declared,
                limit,
            });
        }
        let mut body = out.body;
        let mut bytes = Vec::with_capacity(declared as usize);
        while let Some(chunk) = body.try_next().await.map_err(|e| StoreError::Unavailable {
            uri: uri.clone(),
            detail: format!("body: {e}"),
        })? {
            bytes.extend_from_slice(&chunk);
            progress(chunk.len() as u64);
            if bytes.len() as u64 > limit {
                return Err(StoreError::TooLarge {
                    uri,
                    size: bytes.len() as u64,
                    limit,
                });
            }
        }
        Ok(bytes)
    }

    /// A URL that reads the object without credentials from `signed_at` until
    /// `lifetime` has passed (SigV4 query signing; at most 7 days). Made
    /// locally, no request. URLs signed at the same instant for the same
    /// lifetime differ only in their path and `X-Amz-Signature`.
    pub async fn presign_get(
        &self,
        bucket: &str,
        key: &str,
        signed_at: std::time::SystemTime,
        lifetime: Duration,
    ) -> Result<String, StoreError> {
        check_key(key)?;
        let uri = s3_uri(bucket, key);
        let config = aws_sdk_s3::presigning::PresigningConfig::builder()
            .start_time(signed_at)
            .expires_in(lifetime)
            .build()
            .map_err(|e| StoreError::Backend {
                uri: uri.clone(),
                detail: format!("cannot presign: {e}"),
            })?;
        let req = self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .presigned(config)
            .await
            .map_err(|e| classify(&uri, &e))?;
        Ok(req.uri().to_string())
    }

    /// Writes an object (with its sha256 as metadata). `bytes` is cheap to
    /// clone, so a retried PUT sends the same buffer again.
    pub async fn put(
        &self,
        bucket: &str,
        key: &str,
        bytes: bytes::Bytes,
        content_type: &str,
    ) -> Result<(), StoreError> {
        check_key(key)?;
        let uri = s3_uri(bucket, key);
        let sha = crate::hashing::sha256_hex(&bytes);
        self.client
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type(content_type)
            .metadata("sha256", &sha)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify(&uri, &e))
    }

    /// Creates an object only if no object has its key (`If-None-Match: *`):
    /// true when this call created it, false when one existed (412). A store
    /// that ignores the header overwrites and answers true: see
    /// [`S3Client::conditional_writes`]. A concurrent conditional write
    /// (409) is transient.
    pub async fn put_if_absent(
        &self,
        bucket: &str,
        key: &str,
        bytes: bytes::Bytes,
        content_type: &str,
    ) -> Result<bool, StoreError> {
        check_key(key)?;
        let uri = s3_uri(bucket, key);
        let sha = crate::hashing::sha256_hex(&bytes);
        let sent = self
            .client
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type(content_type)
            .metadata("sha256", &sha)
            .if_none_match("*")
            .body(ByteStream::from(bytes))
            .send()
            .await;
        match sent {
            Ok(_) => Ok(true),
            Err(e) => match e.raw_response().map(|r| r.status().as_u16()) {
                Some(412) => Ok(false),
                Some(409) => Err(StoreError::Unavailable {
                    uri,
                    detail: "a concurrent conditional write to the same key (409)".into(),
                }),
                _ => Err(classify(&uri, &e)),
            },
        }
    }

    /// Whether the store honours `If-None-Match: *` on PutObject (AWS S3
    /// since 2024, MinIO, Cloudflare R2, Ceph RGW; Garage 2.5 ignores it):
    /// writes `probe_key` twice with the header and expects the second to be
    /// refused with 412, then deletes it. `probe_key` must be unique to the
    /// caller (a worker's name and start time).
    pub async fn conditional_writes(
        &self,
        bucket: &str,
        probe_key: &str,
    ) -> Result<bool, StoreError> {
        let body = bytes::Bytes::from_static(b"cinflow conditional-write probe\n");
        let first = self
            .put_if_absent(bucket, probe_key, body.clone(), "text/plain")
            .await?;
        let second = self
            .put_if_absent(bucket, probe_key, body, "text/plain")
            .await;
        let _ = self.delete(bucket, probe_key).await;
        Ok(first && !second?)
    }

    /// Starts a multipart upload (objects over [`MULTIPART_OVER`] bytes) and
    /// returns its id; the whole object's sha256 goes into the metadata.
    pub async fn create_multipart(
        &self,
        bucket: &str,
        key: &str,
        content_type: &str,
        sha256: &str,
    ) -> Result<String, StoreError> {
        check_key(key)?;
        let uri = s3_uri(bucket, key);
        let out = self
            .client
            .create_multipart_upload()
            .bucket(bucket)
            .key(key)
            .content_type(content_type)
            .metadata("sha256", sha256)
            .send()
            .await
            .map_err(|e| classify(&uri, &e))?;
        out.upload_id()
            .map(str::to_string)
            .ok_or(StoreError::Backend {
                uri,
                detail: "multipart upload started without an upload id".into(),
            })
    }

    /// Uploads part `number` (from 1) and returns its ETag.
    pub async fn upload_part(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        number: i32,
        bytes: bytes::Bytes,
    ) -> Result<String, StoreError> {
        let uri = s3_uri(bucket, key);
        let out = self
            .client
            .upload_part()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|e| classify(&uri, &e))?;
        out.e_tag().map(str::to_string).ok_or(StoreError::Backend {
            uri,
            detail: format!("part {number} uploaded without an ETag"),
        })
    }

    /// Completes a multipart upload from its parts' ETags, in order: only now
    /// does the object appear, whole.
    pub async fn complete_multipart(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        etags: &[String],
    ) -> Result<(), StoreError> {
        use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
        let uri = s3_uri(bucket, key);
        let parts = etags
            .iter()
            .zip(1..)
            .map(|(e, n)| CompletedPart::builder().part_number(n).e_tag(e).build())
            .collect();
        self.client
            .complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify(&uri, &e))
    }

    /// Drops an unfinished multipart upload's parts (best effort).
    pub async fn abort_multipart(&self, bucket: &str, key: &str, upload_id: &str) {
        let _ = self
            .client
            .abort_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await;
    }

    /// An object's user metadata (such as the `sha256` every PUT records).
    pub async fn head_metadata(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<std::collections::HashMap<String, String>, StoreError> {
        check_key(key)?;
        let uri = s3_uri(bucket, key);
        let out = self
            .client
            .head_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify(&uri, &e))?;
        Ok(out.metadata().cloned().unwrap_or_default())
    }

    /// Whether an object exists.
    pub async fn exists(&self, bucket: &str, key: &str) -> Result<bool, StoreError> {
        check_key(key)?;
        let uri = s3_uri(bucket, key);
        match self
            .client
            .head_object()
            .bucket(bucket)
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
    }

    /// Every key under `prefix`, sorted (all listing pages).
    pub async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .list_objects(bucket, prefix)
            .await?
            .into_iter()
            .map(|o| o.key)
            .collect())
    }

    /// Every object under `prefix` with its ETag, size and last-modified
    /// time (every listing page), sorted by key.
    pub async fn list_objects(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<ListedObject>, StoreError> {
        let uri = s3_uri(bucket, prefix);
        let mut objects = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .client
                .list_objects_v2()
                .bucket(bucket)
                .prefix(prefix)
                .set_continuation_token(token.clone())
                .send()
                .await
                .map_err(|e| classify(&uri, &e))?;
            objects.extend(out.contents().iter().filter_map(|o| {
                Some(ListedObject {
                    key: o.key()?.to_string(),
                    etag: o.e_tag().unwrap_or_default().trim_matches('"').to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    modified_unix_s: o.last_modified().map(|t| t.secs()).unwrap_or(0),
                })
            }));
            match out.next_continuation_token() {
                Some(t) if out.is_truncated().unwrap_or(false) => token = Some(t.to_string()),
                _ => break,
            }
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    /// Deletes an object (no error when it is absent).
    pub async fn delete(&self, bucket: &str, key: &str) -> Result<(), StoreError> {
        check_key(key)?;
        let uri = s3_uri(bucket, key);
        self.client
            .delete_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify(&uri, &e))
    }
}

/// Splits `s3://bucket/prefix` (the prefix may be empty: the whole bucket).
pub fn split_s3_prefix(uri: &str) -> Option<(&str, &str)> {
    let rest = uri.strip_prefix("s3://")?;
    Some(rest.split_once('/').unwrap_or((rest, ""))).filter(|(b, _)| !b.is_empty())
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    pub key: String,
    /// Without quotes.
    pub etag: String,
    pub size: u64,
    /// Last-modified time, seconds since the Unix epoch (0 when not given).
    pub modified_unix_s: i64,
}

/// The runtime an [`S3Store`] blocks on.
enum Runtime {
    /// The runtime it was made in (its caller runs on that runtime's blocking threads).
    Shared(tokio::runtime::Handle),
    /// Its own, when made outside any runtime. Always `Some` until dropped.
    Own(Option<tokio::runtime::Runtime>),
}

impl Runtime {
    fn here() -> Result<Runtime, StoreError> {
        match tokio::runtime::Handle::try_current() {
            Ok(h) => Ok(Runtime::Shared(h)),
            Err(_) => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("cinflow-s3")
                .enable_all()
                .build()
                .map(|rt| Runtime::Own(Some(rt)))
                .map_err(|source| StoreError::Io {
                    uri: "s3 runtime".into(),
                    source,
                }),
        }
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        match self {
            Runtime::Shared(h) => h.block_on(f),
            Runtime::Own(rt) => rt.as_ref().expect("runtime until drop").block_on(f),
        }
    }
}

impl Drop for Runtime {
    /// The last reference may go away inside an async task (a worker giving up
    /// at start-up): shut an own runtime down without blocking there.
    fn drop(&mut self) {
        if let Runtime::Own(rt) = self {
            if let Some(rt) = rt.take() {
                rt.shutdown_background();
            }
        }
    }
}

/// A bucket as a synchronous object store.
pub struct S3Store {
    client: S3Client,
    bucket: String,
    policy: RetryPolicy,
    rt: Runtime,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("endpoint", &self.client.endpoint)
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

impl S3Config {
    /// The per-operation retries of a synchronous [`S3Store`] (`--s3-attempts`,
    /// `--s3-backoff-ms`).
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            first: Duration::from_millis(self.backoff_ms),
            max: Duration::from_secs(10),
            limit: Limit::Attempts(self.attempts.max(1)),
        }
    }
}

impl S3Store {
    /// Connects to `cfg.bucket` (lazily: the first request opens the connection).
    /// Call it from a blocking thread or outside any runtime.
    pub fn new(cfg: &S3Config) -> Result<S3Store, StoreError> {
        let rt = Runtime::here()?;
        let client = rt.block_on(S3Client::connect(cfg))?;
        Ok(S3Store {
            client,
            bucket: cfg.bucket.clone(),
            policy: cfg.retry_policy(),
            rt,
        })
    }

    /// `bucket` through an existing client, blocking on the current runtime
    /// (call from inside one; use the store from its blocking threads).
    pub fn with_client(client: S3Client, bucket: &str, policy: RetryPolicy) -> S3Store {
        S3Store {
            client,
            bucket: bucket.to_string(),
            policy,
            rt: Runtime::Shared(tokio::runtime::Handle::current()),
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn retry<T, F, Fut>(&self, what: &str, op: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        self.rt.block_on(self.policy.run(what, op))
    }
}

impl ObjectStore for S3Store {
    fn get_limited(&self, key: &str, limit: u64) -> Result<Vec<u8>, StoreError> {
        self.retry("s3 get", || self.client.get(&self.bucket, key, limit))
    }

    fn put(&self, key: &str, bytes: &[u8], content_type: &str) -> Result<(), StoreError> {
        let bytes = bytes::Bytes::copy_from_slice(bytes);
        self.retry("s3 put", || {
            self.client
                .put(&self.bucket, key, bytes.clone(), content_type)
        })
    }

    fn get_reporting(&self, key: &str, progress: &Progress) -> Result<Vec<u8>, StoreError> {
        self.retry("s3 get", || {
            self.client
                .get_reporting(&self.bucket, key, u64::MAX, progress)
        })
    }

    fn put_reporting(
        &self,
        key: &str,
        bytes: &[u8],
        content_type: &str,
        progress: &Progress,
    ) -> Result<(), StoreError> {
        if bytes.len() <= MULTIPART_OVER {
            self.put(key, bytes, content_type)?;
            progress(bytes.len() as u64);
            return Ok(());
        }
        let sha = crate::hashing::sha256_hex(bytes);
        let id = self.retry("s3 create multipart upload", || {
            self.client
                .create_multipart(&self.bucket, key, content_type, &sha)
        })?;
        let parts = || -> Result<Vec<String>, StoreError> {
            let mut etags = Vec::new();
            for (chunk, n) in bytes.chunks(PART_BYTES).zip(1..) {
                let part = bytes::Bytes::copy_from_slice(chunk);
                etags.push(self.retry("s3 upload part", || {
                    self.client
                        .upload_part(&self.bucket, key, &id, n, part.clone())
                })?);
                progress(chunk.len() as u64);
            }
            self.retry("s3 complete multipart upload", || {
                self.client
                    .complete_multipart(&self.bucket, key, &id, &etags)
            })?;
            Ok(etags)
        };
        parts().map(|_| ()).inspect_err(|_| {
            self.rt
                .block_on(self.client.abort_multipart(&self.bucket, key, &id))
        })
    }

    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.retry("s3 head", || self.client.exists(&self.bucket, key))
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.retry("s3 list", || self.client.list(&self.bucket, prefix))
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.retry("s3 delete", || self.client.delete(&self.bucket, key))
    }

    fn uri(&self, key: &str) -> String {
        s3_uri(&self.bucket, key)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefixes_split_into_bucket_and_prefix() {
        use super::split_s3_prefix as split;
        assert_eq!(split("s3://b/scans/in/"), Some(("b", "scans/in/")));
        assert_eq!(split("s3://b"), Some(("b", "")));
        assert_eq!(split("s3://b/"), Some(("b", "")));
        assert_eq!(split("s3:///x"), None);
        assert_eq!(split("b/x"), None);
    }

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
