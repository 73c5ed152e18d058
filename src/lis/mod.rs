//! `cinflow lis-bridge`: results into the LIS in its own protocols.
//!
//! The bridge consumes the result events of the inference workers from a
//! durable queue of its own (`--lis-queue`, bound to the results exchange with
//! `result.*`) and delivers each result to every configured destination:
//! - **HL7 v2.5.1 `ORU^R01` over MLLP** ([`hl7`], [`mllp`]), waiting for the
//!   ACK: `AA` accepts, `AE` and `AR` refuse;
//! - **FHIR R4**: a transaction Bundle ([`crate::result::fhir::transaction`])
//!   POSTed to the server's base URL ([`fhir`]), each resource a conditional
//!   update on its identifier, so a redelivered result never duplicates.
//!
//! Links in both (overlays, images, the viewer page, the record) are presigned
//! S3 URLs that a browser opens until `--link-lifetime-s` has passed.
//!
//! **Acked only after the LIS accepted.** A destination that accepted gets a
//! receipt beside the result (`lis/<destination>.json`: what was sent, what
//! the LIS answered); a redelivered result skips the destinations with a
//! receipt for the same result, so a crash after one destination accepted
//! does not send it there twice. What is not accepted is settled by the
//! consumer loop the workers use: transient failures (LIS unreachable, no ACK,
//! 5xx, throttling, a token not accepted) are retried with backoff for
//! `--retry-for-s`, then wait in `<queue>.delay` and come back, up to
//! `--retry-rounds`; a refusal (`AE`/`AR`, a 4xx with an OperationOutcome) is
//! dead-lettered into `<queue>.dlq` with the LIS's answer as the reason, as
//! is a result no LIS could file (neither a patient nor an accession id).
//!
//! Between a destination accepting and its receipt being written (a crash, an
//! S3 outage) the result may be sent again: the same result always gives the
//! same HL7 message control id and the same FHIR identifiers, so a receiver
//! can recognise the repeat, and the FHIR server updates rather than creates.
//!
//! With `--signout-mllp` (HL7 v2) or `--signout-fhir` (FHIR R4) the bridge
//! also takes the LIS's signed-out results and keeps the training manifest
//! ([`signout`]).

pub mod fhir;
pub mod hl7;
pub mod mllp;
pub mod signout;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::observe::metrics;
use crate::queue::consumer::settle::Outcome;
use crate::queue::consumer::ConsumerConfig;
use crate::queue::consumer::{Broker, Handler, Incoming};
use crate::queue::{AmqpConfig, Subscription};
use crate::result::fhir::Systems;
use crate::result::{ResultRecord, RESULT_SCHEMA};
use crate::retry::{RetryPolicy, Transient};
use crate::storage::{S3Client, S3Config, StoreError};
use crate::worker::keys::Keys;
use crate::worker::stores::split_s3_uri;

/// Default `--job-timeout-s` of the bridge: one result's deliveries.
pub const LIS_JOB_TIMEOUT_S: u64 = 600;
/// Schema tag of a delivery receipt.
pub const RECEIPT_SCHEMA: &str = "cinflow.lis-receipt/v1";

/// `cinflow lis-bridge`.
#[derive(Debug, Clone, clap::Args)]
pub struct LisBridgeArgs {
    /// The bridge's own durable queue on the results exchange.
    #[arg(long, env = "CINFLOW_LIS_QUEUE", default_value = "cinflow.lis")]
    pub lis_queue: String,
    /// HL7 v2 destination: the LIS's MLLP receiver as host:port.
    #[arg(long, env = "CINFLOW_LIS_HL7_MLLP", value_name = "HOST:PORT")]
    pub hl7_mllp: Option<String>,
    /// MSH-3 sending application (also the namespace of filler ids and links).
    #[arg(
        long,
        env = "CINFLOW_LIS_HL7_SENDING_APPLICATION",
        default_value = "CINFLOW"
    )]
    pub hl7_sending_application: String,
    /// MSH-4 sending facility.
    #[arg(long, env = "CINFLOW_LIS_HL7_SENDING_FACILITY", default_value = "")]
    pub hl7_sending_facility: String,
    /// MSH-5 receiving application.
    #[arg(
        long,
        env = "CINFLOW_LIS_HL7_RECEIVING_APPLICATION",
        default_value = "LIS"
    )]
    pub hl7_receiving_application: String,
    /// MSH-6 receiving facility.
    #[arg(long, env = "CINFLOW_LIS_HL7_RECEIVING_FACILITY", default_value = "")]
    pub hl7_receiving_facility: String,
    /// MSH-11 processing id: P (production), T (training), D (debugging).
    #[arg(long, env = "CINFLOW_LIS_HL7_PROCESSING_ID", default_value = "P")]
    pub hl7_processing_id: String,
    /// Assigning authority of patient ids (PID-3.4).
    #[arg(long, env = "CINFLOW_LIS_HL7_PATIENT_AUTHORITY", default_value = "")]
    pub hl7_patient_authority: String,
    /// Seconds to wait for a connection and for each ACK.
    #[arg(long, env = "CINFLOW_LIS_HL7_ACK_TIMEOUT_S", default_value_t = 30)]
    pub hl7_ack_timeout_s: u64,
    /// FHIR destination: the server's base URL (transaction Bundles are POSTed to it).
    #[arg(long, env = "CINFLOW_LIS_FHIR_BASE", value_name = "URL")]
    pub fhir_base: Option<String>,
    /// File holding the FHIR server's bearer token, read before every request.
    #[arg(long, env = "CINFLOW_LIS_FHIR_TOKEN_FILE", hide_env_values = true)]
    pub fhir_token_file: Option<PathBuf>,
    /// The bearer token itself (prefer --fhir-token-file); `--help` never
    /// shows the environment's value.
    #[arg(long, env = "CINFLOW_LIS_FHIR_TOKEN", hide_env_values = true)]
    pub fhir_token: Option<String>,
    /// Seconds one FHIR request may take.
    #[arg(long, env = "CINFLOW_LIS_FHIR_TIMEOUT_S", default_value_t = 60)]
    pub fhir_timeout_s: u64,
    /// PEM file of a private CA that signed the FHIR server's certificate.
    #[arg(long, env = "CINFLOW_LIS_CA_FILE")]
    pub lis_ca_file: Option<PathBuf>,
    /// Base of the identifier systems (patient, specimen, accession, result
    /// ids), as the workers' --fhir-system.
    #[arg(long, env = "CINFLOW_FHIR_SYSTEM", default_value = "urn:cinflow")]
    pub fhir_system: String,
    /// Seconds the presigned links in the messages stay valid (at most 7 days).
    #[arg(long, env = "CINFLOW_LIS_LINK_LIFETIME_S", default_value_t = 604_800)]
    pub link_lifetime_s: u64,
    /// The S3 endpoint as the LIS's users reach it, for the links (default:
    /// --s3-endpoint, which may be a cluster-internal name).
    #[arg(long, env = "CINFLOW_LIS_LINK_ENDPOINT", value_name = "URL")]
    pub link_endpoint: Option<String>,
    /// Take the LIS's signed-out results (HL7 v2 ORU^R01, final or
    /// corrected) over MLLP on this address, e.g. 0.0.0.0:2576; needs
    /// --signout-prefix.
    #[arg(long, env = "CINFLOW_LIS_SIGNOUT_MLLP", value_name = "ADDR")]
    pub signout_mllp: Option<String>,
    /// Take signed-out results as FHIR R4 DiagnosticReports POSTed to
    /// `http://ADDR/.../DiagnosticReport` (status final, corrected or
    /// amended); needs --signout-prefix.
    #[arg(long, env = "CINFLOW_LIS_SIGNOUT_FHIR", value_name = "ADDR")]
    pub signout_fhir: Option<String>,
    /// Where sign-outs go: s3://bucket/prefix holding the order index, one
    /// object per signed-out case and the training manifest `labels.csv`.
    #[arg(long, env = "CINFLOW_LIS_SIGNOUT_PREFIX", value_name = "S3_PREFIX")]
    pub signout_prefix: Option<String>,
    /// CSV `system,code,grade` of diagnosis codes beyond the built-in SNOMED
    /// CT ones (grades: CIN3, CIN2, CIN1, Non-neoplasm).
    #[arg(long, env = "CINFLOW_LIS_SIGNOUT_MAP")]
    pub signout_map: Option<PathBuf>,
    #[command(flatten)]
    pub consumer: ConsumerConfig,
    #[command(flatten)]
    pub amqp: AmqpConfig,
    #[command(flatten)]
    pub s3: S3Config,
}

/// Why the bridge cannot start.
#[derive(Debug, thiserror::Error)]
pub enum LisError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Fhir(#[from] fhir::FhirError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A destination's name in receipts, metrics and reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Hl7,
    Fhir,
}

impl Destination {
    pub fn name(self) -> &'static str {
        match self {
            Destination::Hl7 => "hl7",
            Destination::Fhir => "fhir",
        }
    }
}

/// What a destination answered, as a receipt records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    pub schema: String,
    pub destination: String,
    /// `created_at` of the result delivered: a regraded result is delivered again.
    pub result_created_at: String,
    /// Where it went (`host:port`, the FHIR base URL).
    pub to: String,
    /// HL7: the message control id; FHIR: empty.
    #[serde(default)]
    pub message_id: String,
    /// HL7: MSA-1 and its text; FHIR: the HTTP status and each entry's status and location.
    pub answer: String,
    pub delivered_at: String,
}

/// A delivery that did not end in acceptance.
#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    /// The LIS refused: dead-letter with its answer.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unavailable(String),
}

impl Transient for DeliveryError {
    fn is_transient(&self) -> bool {
        matches!(self, DeliveryError::Unavailable(_))
    }
}

impl From<fhir::FhirError> for DeliveryError {
    fn from(e: fhir::FhirError) -> Self {
        if e.is_transient() {
            DeliveryError::Unavailable(e.to_string())
        } else {
            DeliveryError::Refused(e.to_string())
        }
    }
}

impl From<StoreError> for DeliveryError {
    fn from(e: StoreError) -> Self {
        if e.is_transient() {
            DeliveryError::Unavailable(e.to_string())
        } else {
            DeliveryError::Refused(e.to_string())
        }
    }
}

/// The bridge's message handler.
pub struct Bridge {
    pub hl7: Option<(mllp::MllpClient, hl7::Hl7Config)>,
    pub fhir: Option<fhir::FhirClient>,
    pub systems: Systems,
    /// Receipts.
    pub s3: S3Client,
    /// Presigns the links (the same client, or one for --link-endpoint).
    pub presigner: S3Client,
    pub link_lifetime: Duration,
    pub retry: RetryPolicy,
    /// Sign-outs: the order index written for every result with an accession.
    pub signouts: Option<Arc<signout::SignoutStore>>,
}

impl Bridge {
    fn destinations(&self) -> Vec<Destination> {
        let mut d = Vec::new();
        if self.hl7.is_some() {
            d.push(Destination::Hl7);
        }
        if self.fhir.is_some() {
            d.push(Destination::Fhir);
        }
        d
    }

    /// Every `s3://` URI of the record mapped to a presigned URL, all signed
    /// at one instant; the viewer page's link also carries its images'
    /// signatures ([`crate::viewer::presigned_link`]), as the page loads them
    /// from beside it.
    async fn links(&self, r: &ResultRecord) -> Result<BTreeMap<String, String>, StoreError> {
        let signed_at = std::time::SystemTime::now();
        let mut uris: Vec<&str> = Vec::new();
        uris.extend(r.viewer_uri.as_deref());
        uris.extend(r.result_uri.as_deref());
        uris.extend(r.fhir_report_uri.as_deref());
        for i in &r.images {
            uris.push(&i.uri);
            uris.extend(i.heatmaps.iter().map(|h| h.overlay.as_str()));
            uris.extend(i.preprocessed_image.as_deref());
        }
        let mut out = BTreeMap::new();
        for uri in uris {
            let Some((bucket, key)) = split_s3_uri(uri) else {
                continue;
            };
            let url = self
                .presigner
                .presign_get(bucket, key, signed_at, self.link_lifetime)
                .await?;
            out.insert(uri.to_string(), url);
        }
        let viewer = r.viewer_uri.as_deref();
        if let Some((viewer, page)) = viewer.and_then(|v| Some((v, out.get(v)?))) {
            let images: Vec<Option<&str>> = r
                .images
                .iter()
                .map(|i| {
                    let uri = i.preprocessed_image.as_deref()?;
                    out.get(uri).map(String::as_str)
                })
                .collect();
            let link = crate::viewer::presigned_link(page, &images);
            out.insert(viewer.to_string(), link);
        }
        Ok(out)
    }

    /// Where the receipts of `r` live: (bucket, keys), for results the workers wrote.
    fn receipts(r: &ResultRecord) -> Option<(String, Keys)> {
        let (bucket, key) = split_s3_uri(r.result_uri.as_deref()?)?;
        Some((bucket.to_string(), Keys::of_result(key)?))
    }

    async fn receipt(
        &self,
        at: &Option<(String, Keys)>,
        d: Destination,
    ) -> Result<Option<Receipt>, StoreError> {
        let Some((bucket, keys)) = at else {
            return Ok(None);
        };
        match self
            .s3
            .get(bucket, &keys.lis_receipt(d.name()), 1 << 20)
            .await
        {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Delivers `r` to one destination (retrying transient failures); the receipt.
    async fn deliver(
        &self,
        d: Destination,
        r: &ResultRecord,
        links: &BTreeMap<String, String>,
    ) -> Result<Receipt, DeliveryError> {
        let link = |u: &str| links.get(u).cloned().unwrap_or_else(|| u.to_string());
        let now = || chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        match d {
            Destination::Hl7 => {
                let (client, cfg) = self.hl7.as_ref().expect("configured");
                let oru = hl7::oru_r01(r, cfg, &link);
                let answer = self
                    .retry
                    .run("deliver hl7", || async {
                        let text = client
                            .send(&oru.text)
                            .await
                            .map_err(|e| DeliveryError::Unavailable(e.to_string()))?;
                        let ack = hl7::parse_ack(&text).map_err(|e| {
                            DeliveryError::Unavailable(format!("MLLP {}: {e}", client.addr()))
                        })?;
                        if ack.control_id != oru.control_id {
                            return Err(DeliveryError::Unavailable(format!(
                                "MLLP {}: the ACK is for message {:?}, not {:?}",
                                client.addr(),
                                ack.control_id,
                                oru.control_id
                            )));
                        }
                        Ok(ack)
                    })
                    .await?;
                if !answer.accepted() {
                    return Err(DeliveryError::Refused(format!(
                        "the LIS at {} answered {} to ORU^R01 {}: {}",
                        client.addr(),
                        answer.code,
                        oru.control_id,
                        if answer.text.is_empty() {
                            "no text"
                        } else {
                            &answer.text
                        }
                    )));
                }
                Ok(Receipt {
                    schema: RECEIPT_SCHEMA.into(),
                    destination: d.name().into(),
                    result_created_at: r.created_at.clone(),
                    to: client.addr().into(),
                    message_id: oru.control_id,
                    answer: format!("{} {}", answer.code, answer.text).trim().into(),
                    delivered_at: now(),
                })
            }
            Destination::Fhir => {
                let client = self.fhir.as_ref().expect("configured");
                let bundle = crate::result::fhir::transaction(r, &self.systems, &link);
                let ok = self
                    .retry
                    .run("deliver fhir", || async {
                        client
                            .transaction(&bundle)
                            .await
                            .map_err(DeliveryError::from)
                    })
                    .await?;
                let entries: Vec<String> = ok
                    .entries
                    .iter()
                    .map(|(s, l)| format!("{s} {l}").trim().to_string())
                    .collect();
                Ok(Receipt {
                    schema: RECEIPT_SCHEMA.into(),
                    destination: d.name().into(),
                    result_created_at: r.created_at.clone(),
                    to: client.base().into(),
                    message_id: String::new(),
                    answer: format!("HTTP {}; {}", ok.status, entries.join(", ")),
                    delivered_at: now(),
                })
            }
        }
    }

    /// Delivers one result event to every destination without a receipt.
    async fn handle_result(&self, msg: &Incoming) -> Outcome {
        let r = match parse_result(&msg.data) {
            Ok(r) => r,
            Err(reason) => return Outcome::Rejected { reason },
        };
        if r.ids.patient_id.is_none() && r.ids.accession_id.is_none() {
            return Outcome::Rejected {
                reason: format!(
                    "result of job {} names neither a patient nor an accession id: no LIS can file it",
                    r.job_id.as_deref().unwrap_or("(none)")
                ),
            };
        }
        if let Some(store) = &self.signouts {
            if let Err(e) = store.record_order(&r).await {
                return Outcome::of_failure(&e);
            }
        }
        let at = Self::receipts(&r);
        let links = match self.retry.run("presign links", || self.links(&r)).await {
            Ok(l) => l,
            Err(e) => return Outcome::of_failure(&e),
        };
        let mut refusals = Vec::new();
        for d in self.destinations() {
            match self
                .retry
                .run("read a receipt", || self.receipt(&at, d))
                .await
            {
                Ok(Some(receipt)) if receipt.result_created_at == r.created_at => {
                    tracing::info!(destination = d.name(), job_id = ?r.job_id, "delivered before (receipt); not sent again");
                    metrics().lis_delivered(d.name(), "skipped");
                    continue;
                }
                Ok(_) => {}
                Err(e) => return Outcome::of_failure(&e),
            }
            match self.deliver(d, &r, &links).await {
                Ok(receipt) => {
                    tracing::info!(destination = d.name(), job_id = ?r.job_id, answer = %receipt.answer, "delivered to the LIS");
                    metrics().lis_delivered(d.name(), "accepted");
                    if let Some((bucket, keys)) = &at {
                        let json = serde_json::to_vec_pretty(&receipt).expect("receipt serialises");
                        let key = keys.lis_receipt(d.name());
                        let put = self
                            .retry
                            .run("write a receipt", || {
                                self.s3
                                    .put(bucket, &key, json.clone().into(), "application/json")
                            })
                            .await;
                        if let Err(e) = put {
                            return Outcome::of_failure(&e);
                        }
                    }
                }
                Err(e @ DeliveryError::Refused(_)) => {
                    tracing::warn!(destination = d.name(), job_id = ?r.job_id, reason = %e, "the LIS refused the result");
                    metrics().lis_delivered(d.name(), "refused");
                    refusals.push(format!("{}: {e}", d.name()));
                }
                Err(e) => {
                    metrics().lis_delivered(d.name(), "failed");
                    return Outcome::Retry {
                        reason: format!("{}: {e}", d.name()),
                    };
                }
            }
        }
        if refusals.is_empty() {
            Outcome::Done
        } else {
            Outcome::Rejected {
                reason: refusals.join("; "),
            }
        }
    }
}

/// A result event's record, or why it is not one.
fn parse_result(bytes: &[u8]) -> Result<ResultRecord, String> {
    let r: ResultRecord =
        serde_json::from_slice(bytes).map_err(|e| format!("not a {RESULT_SCHEMA} record: {e}"))?;
    if r.schema != RESULT_SCHEMA {
        return Err(format!(
            "result schema is {:?}, expected {RESULT_SCHEMA:?}",
            r.schema
        ));
    }
    Ok(r)
}

impl Handler for Bridge {
    async fn handle(self: Arc<Self>, msg: Incoming, broker: Broker) -> Outcome {
        // One delivery of a result at a time over every bridge and every
        // concurrent event: two events for one result cannot both miss the
        // receipt and both send. Unparseable events need no lease.
        let Some(id) = lease_id(&msg.data) else {
            return self.handle_result(&msg).await;
        };
        let what = format!("the result {id}");
        broker.leased(&id, &what, self.handle_result(&msg)).await
    }

    async fn poison(self: Arc<Self>, _msg: Incoming, reason: String, _broker: Broker) -> Outcome {
        // Nothing to write: the result itself is in S3; the dead letter keeps the event.
        Outcome::Rejected { reason }
    }
}

/// What a result event's lease is named after: the result record it
/// announces (its S3 URI), else its job and model version.
fn lease_id(event: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(event).ok()?;
    if let Some(uri) = v.get("result_uri").and_then(|u| u.as_str()) {
        return Some(uri.to_string());
    }
    let job = v.get("job_id")?.as_str()?;
    let version = v.get("model")?.get("version")?.as_str()?;
    Some(format!("{job}:{version}"))
}

/// The bridge's queue on the results exchange.
pub fn subscription(a: &LisBridgeArgs) -> Subscription {
    Subscription {
        queue: a.lis_queue.clone(),
        exchange: a.amqp.results_exchange.clone(),
        keys: vec!["result.*".into()],
    }
}

impl LisBridgeArgs {
    /// The destinations, checked: at least one, and settings that can work.
    pub fn destinations(&self) -> Result<Destinations, LisError> {
        let takes_signouts = self.signout_mllp.is_some() || self.signout_fhir.is_some();
        if self.hl7_mllp.is_none() && self.fhir_base.is_none() && !takes_signouts {
            return Err(LisError::Usage(
                "nothing to do: give --hl7-mllp HOST:PORT, --fhir-base URL and/or --signout-mllp/--signout-fhir ADDR".into(),
            ));
        }
        if takes_signouts != self.signout_prefix.is_some() {
            return Err(LisError::Usage(
                "--signout-prefix goes with --signout-mllp and/or --signout-fhir".into(),
            ));
        }
        if let Some(p) = &self.signout_prefix {
            if crate::storage::split_s3_prefix(p)
                .is_none_or(|(_, prefix)| prefix.trim_matches('/').is_empty())
            {
                return Err(LisError::Usage(format!(
                    "--signout-prefix {p:?} is not s3://bucket/prefix"
                )));
            }
        }
        if self.link_lifetime_s == 0 || self.link_lifetime_s > 604_800 {
            return Err(LisError::Usage(format!(
                "--link-lifetime-s {} must be between 1 and 604800 (7 days, the longest a presigned S3 URL lives)",
                self.link_lifetime_s
            )));
        }
        let hl7 = match &self.hl7_mllp {
            Some(addr) => {
                let ok = addr
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
                if !ok {
                    return Err(LisError::Usage(format!(
                        "--hl7-mllp {addr:?} is not HOST:PORT"
                    )));
                }
                if !["P", "T", "D"].contains(&self.hl7_processing_id.as_str()) {
                    return Err(LisError::Usage(format!(
                        "--hl7-processing-id {:?} must be P, T or D",
                        self.hl7_processing_id
                    )));
                }
                let cfg = hl7::Hl7Config {
                    sending_application: self.hl7_sending_application.clone(),
                    sending_facility: self.hl7_sending_facility.clone(),
                    receiving_application: self.hl7_receiving_application.clone(),
                    receiving_facility: self.hl7_receiving_facility.clone(),
                    processing_id: self.hl7_processing_id.clone(),
                    patient_authority: self.hl7_patient_authority.clone(),
                };
                let timeout = Duration::from_secs(self.hl7_ack_timeout_s.max(1));
                Some((mllp::MllpClient::new(addr, timeout), cfg))
            }
            None => None,
        };
        let fhir = match &self.fhir_base {
            Some(base) => {
                if !(base.starts_with("http://") || base.starts_with("https://")) {
                    return Err(LisError::Usage(format!(
                        "--fhir-base {base:?} is not an http:// or https:// URL"
                    )));
                }
                let token = match (&self.fhir_token_file, &self.fhir_token) {
                    (Some(_), Some(_)) => {
                        return Err(LisError::Usage(
                            "give --fhir-token-file or --fhir-token, not both".into(),
                        ))
                    }
                    (Some(f), None) => fhir::Token::File(f.clone()),
                    (None, Some(t)) => fhir::Token::Value(t.clone()),
                    (None, None) => fhir::Token::None,
                };
                Some(fhir::FhirClient::new(
                    base,
                    token,
                    self.lis_ca_file.as_deref(),
                    Duration::from_secs(self.fhir_timeout_s.max(1)),
                )?)
            }
            None => None,
        };
        Ok(Destinations { hl7, fhir })
    }
}

/// The configured destinations.
pub struct Destinations {
    pub hl7: Option<(mllp::MllpClient, hl7::Hl7Config)>,
    pub fhir: Option<fhir::FhirClient>,
}

/// Runs the bridge until SIGTERM/SIGINT.
pub async fn run(a: LisBridgeArgs) -> anyhow::Result<()> {
    let Destinations { hl7, fhir } = a.destinations()?;
    let shutdown = crate::worker::shutdown_signal()?;
    let name = crate::worker::worker_name("lis-bridge");
    tracing::info!(worker = %name, amqp = ?a.amqp, queue = %a.lis_queue, hl7 = ?a.hl7_mllp, fhir = ?a.fhir_base, "starting");
    a.consumer.serve_http().await?;
    crate::observe::health().set_model_loaded(true);
    let s3 = S3Client::connect(&a.s3).await?;
    let presigner = match &a.link_endpoint {
        Some(e) => {
            S3Client::connect(&S3Config {
                endpoint: Some(e.clone()),
                ..a.s3.clone()
            })
            .await?
        }
        None => s3.clone(),
    };
    let signouts = match &a.signout_prefix {
        Some(p) => {
            let (bucket, prefix) = crate::storage::split_s3_prefix(p).expect("checked");
            let map = match &a.signout_map {
                Some(f) => signout::GradeMap::with_file(f).map_err(LisError::Usage)?,
                None => signout::GradeMap::defaults(),
            };
            let store = Arc::new(signout::SignoutStore::new(
                s3.clone(),
                bucket,
                prefix,
                map,
                a.consumer.retry_policy(),
            ));
            // Heals an update lost to two bridges writing at once.
            let rows = store.update_manifest(None).await?;
            tracing::info!(manifest = %store.manifest_uri(), rows, "training manifest rebuilt from the signed-out cases");
            if let Some(addr) = &a.signout_mllp {
                signout::serve_mllp(addr, store.clone()).await?;
            }
            if let Some(addr) = &a.signout_fhir {
                signout::serve_fhir(addr, store.clone()).await?;
            }
            Some(store)
        }
        None => None,
    };
    let bridge = Arc::new(Bridge {
        hl7,
        fhir,
        systems: Systems::new(&a.fhir_system),
        s3,
        presigner,
        link_lifetime: Duration::from_secs(a.link_lifetime_s),
        retry: a.consumer.retry_policy(),
        signouts,
    });
    let sub = subscription(&a);
    let mut opts = a.consumer.consume_options(
        &a.amqp,
        sub.queue.clone(),
        sub.dlq(),
        a.consumer.concurrency,
        &name,
        LIS_JOB_TIMEOUT_S,
    );
    opts.subscribe = Some(sub);
    crate::queue::consumer::run(bridge, opts, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_events_are_named() {
        assert!(parse_result(b"{")
            .unwrap_err()
            .contains("not a cinflow.result/v2 record"));
        let mut r = ResultRecord::new(
            Some("j".into()),
            None,
            &crate::model::Manifest::example(),
            "cpu",
            vec![],
        );
        r.schema = "cinflow.result/v1".into();
        let e = parse_result(&serde_json::to_vec(&r).unwrap()).unwrap_err();
        assert!(e.contains("expected \"cinflow.result/v2\""), "{e}");
    }

    #[test]
    fn receipts_live_beside_the_result() {
        let k = Keys::of_result("results/job-1/cin4/v3/result.json").unwrap();
        assert_eq!(k.lis_receipt("hl7"), "results/job-1/cin4/v3/lis/hl7.json");
        assert!(Keys::of_result("results/job-1/other.json").is_none());
    }
}
