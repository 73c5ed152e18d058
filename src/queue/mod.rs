//! RabbitMQ (AMQP 0-9-1, lapin): the topology the workers declare, publishing
//! with confirms, and the message schemas.
//!
//!Topology (every name configurable; tests use unique ones):
//! - direct exchange `cinflow.jobs`: routing key `infer` -> quorum queue
//!   `cinflow.infer`, key `train` -> quorum queue `cinflow.train`;
//! - both queues have a delivery limit and dead-letter into the direct exchange
//!   `cinflow.jobs.dlx`, which routes to `cinflow.infer.dlq` / `cinflow.train.dlq`,
//!   at least once (`x-dead-letter-strategy: at-least-once`, which needs
//!   `x-overflow: reject-publish`: a full queue refuses publishes instead of
//!   dropping its oldest messages);
//! - delay queues `cinflow.infer.delay` / `cinflow.train.delay` (no consumers):
//!   a job whose transient failures outlasted the retry budget waits there for
//!   its per-message TTL, then dead-letters back to its work queue;
//! - topic exchange `cinflow.results` for result events.
//!
//! Queues created by a release before the delay queues and at-least-once
//! dead-lettering have other arguments; RabbitMQ refuses to redeclare them, and
//! [`declare_topology`] says so with the way out (docs/storage-and-broker.md,
//! "Upgrading the queues").

pub mod consumer;
pub mod deadletters;
pub mod enqueue;
pub mod lease;
pub mod messages;
pub mod migrate;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

/// Routing key of inference jobs.
pub const INFER_KEY: &str = "infer";
/// Routing key of training jobs.
pub const TRAIN_KEY: &str = "train";

/// Broker connection and topology names.
#[derive(Clone, clap::Args)]
pub struct AmqpConfig {
    /// Broker URL (amqp:// or amqps://); the password is never logged, and
    /// `--help` never shows the environment's value.
    #[arg(
        long = "amqp-url",
        env = "CINFLOW_AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub url: String,
    /// Exchange that jobs are published to.
    #[arg(long, env = "CINFLOW_JOBS_EXCHANGE", default_value = "cinflow.jobs")]
    pub jobs_exchange: String,
    /// Quorum queue of inference jobs.
    #[arg(long, env = "CINFLOW_INFER_QUEUE", default_value = "cinflow.infer")]
    pub infer_queue: String,
    /// Quorum queue of training jobs.
    #[arg(long, env = "CINFLOW_TRAIN_QUEUE", default_value = "cinflow.train")]
    pub train_queue: String,
    /// Exchange of result events.
    #[arg(
        long,
        env = "CINFLOW_RESULTS_EXCHANGE",
        default_value = "cinflow.results"
    )]
    pub results_exchange: String,
    /// Deliveries of one message before it is dead-lettered (poison messages).
    #[arg(long, env = "CINFLOW_DELIVERY_LIMIT", default_value_t = 5)]
    pub delivery_limit: u32,
    /// Seconds to wait for the broker to confirm a published message.
    #[arg(long, env = "CINFLOW_CONFIRM_TIMEOUT_S", default_value_t = 30)]
    pub confirm_timeout_s: u64,
    /// Heartbeat interval in seconds asked of the broker (unless the URL sets `heartbeat`).
    #[arg(long, env = "CINFLOW_AMQP_HEARTBEAT_S", default_value_t = 30)]
    pub heartbeat_s: u16,
    /// PEM file of the CA that signed the broker's certificate (amqps:// with a private CA).
    #[arg(
        id = "amqp_ca_file",
        long = "amqp-ca-file",
        env = "CINFLOW_AMQP_CA_FILE"
    )]
    pub ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &redact_url(&self.url))
            .field("jobs_exchange", &self.jobs_exchange)
            .field("infer_queue", &self.infer_queue)
            .field("train_queue", &self.train_queue)
            .field("results_exchange", &self.results_exchange)
            .field("delivery_limit", &self.delivery_limit)
            .field("confirm_timeout_s", &self.confirm_timeout_s)
            .field("heartbeat_s", &self.heartbeat_s)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// The URL with any password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

impl AmqpConfig {
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.jobs_exchange)
    }

    pub fn infer_dlq(&self) -> String {
        format!("{}.dlq", self.infer_queue)
    }

    pub fn train_dlq(&self) -> String {
        format!("{}.dlq", self.train_queue)
    }

    /// The delay queue of a work queue.
    pub fn delay_queue(queue: &str) -> String {
        format!("{queue}.delay")
    }

    /// The quarantine queue of a work queue: deliveries that were in flight
    /// when a worker died, graded one at a time per worker.
    pub fn quarantine_queue(queue: &str) -> String {
        format!("{queue}.quarantine")
    }

    fn confirm_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.confirm_timeout_s.max(1))
    }
}

/// Why a broker operation failed (all but `Config` are worth retrying after a reconnect).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("broker {url}: {detail}")]
    Config { url: String, detail: String },
    #[error("broker {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: lapin::Error,
    },
    #[error("broker: {what}: {source}")]
    Amqp {
        what: String,
        #[source]
        source: lapin::Error,
    },
    #[error("broker refused the message {message_id} ({what})")]
    Nacked { message_id: String, what: String },
    #[error(
        "the broker did not confirm message {message_id} within {seconds} s (--confirm-timeout-s)"
    )]
    ConfirmTimeout { message_id: String, seconds: u64 },
    #[error("queue {queue:?} exists with other arguments than this release declares ({detail}); RabbitMQ cannot change a queue's arguments: move its messages and recreate it with `cinflow queues migrate` (docs/storage-and-broker.md, \"Upgrading the queues\")")]
    Inequivalent { queue: String, detail: String },
    #[error("no queue is bound to exchange {exchange:?} with routing key {routing_key:?}: message {message_id} was returned (is the topology declared?)")]
    Unroutable {
        exchange: String,
        routing_key: String,
        message_id: String,
    },
}

impl crate::retry::Transient for QueueError {
    /// A broker that is down, slow, refused a message or lost the channel may
    /// do better later; a bad URL, an unroutable message (no topology) or a
    /// queue declared with other arguments will not.
    fn is_transient(&self) -> bool {
        !matches!(
            self,
            QueueError::Config { .. }
                | QueueError::Unroutable { .. }
                | QueueError::Inequivalent { .. }
        )
    }
}

/// Names what a failed broker operation was doing.
pub(crate) fn amqp(what: impl Into<String>) -> impl FnOnce(lapin::Error) -> QueueError {
    let what = what.into();
    move |source| QueueError::Amqp { what, source }
}

/// Opens a connection: heartbeats at `heartbeat_s` unless the URL sets them, and
/// for amqps:// the CA file (if given) added to the trusted roots.
pub async fn connect(cfg: &AmqpConfig, name: &str) -> Result<Connection, QueueError> {
    let url = redact_url(&cfg.url);
    let mut uri: AMQPUri = cfg.url.parse().map_err(|e| QueueError::Config {
        url: url.clone(),
        detail: format!("not an AMQP URL: {e}"),
    })?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(cfg.heartbeat_s);
    }
    let mut tls = OwnedTLSConfig::default();
    if let Some(ca) = &cfg.ca_file {
        let pem = std::fs::read_to_string(ca).map_err(|e| QueueError::Config {
            url: url.clone(),
            detail: format!("cannot read CA file {}: {e}", ca.display()),
        })?;
        tls.cert_chain = Some(pem);
    }
    let runtime = lapin::runtime::default_runtime().map_err(|source| QueueError::Connect {
        url: url.clone(),
        source,
    })?;
    Connection::connect_uri_with_config(
        uri,
        ConnectionProperties::default().with_connection_name(name.into()),
        tls,
        runtime,
    )
    .await
    .map_err(|source| QueueError::Connect { url, source })
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Arguments of a quorum queue that does not dead-letter (dead-letter queues,
/// the queue `queues migrate` parks messages in).
pub(crate) fn plain_quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-queue-type"), text("quorum"));
    args
}

/// Arguments of a quorum queue that dead-letters at least once to
/// `exchange` with `key`.
fn quorum_args(exchange: &str, key: &str) -> FieldTable {
    let mut args = plain_quorum_args();
    args.insert(ShortString::from("x-dead-letter-exchange"), text(exchange));
    args.insert(ShortString::from("x-dead-letter-routing-key"), text(key));
    args.insert(
        ShortString::from("x-dead-letter-strategy"),
        text("at-least-once"),
    );
    args.insert(ShortString::from("x-overflow"), text("reject-publish"));
    args
}

/// Declares a durable queue; a queue that exists with other arguments is
/// named as such.
async fn declare_queue(ch: &Channel, queue: &str, args: FieldTable) -> Result<(), QueueError> {
    ch.queue_declare(queue.into(), QueueDeclareOptions::durable(), args)
        .await
        .map(|_| ())
        .map_err(|source| match inequivalent(&source) {
            Some(detail) => QueueError::Inequivalent {
                queue: queue.to_string(),
                detail,
            },
            None => QueueError::Amqp {
                what: format!("declare queue {queue}"),
                source,
            },
        })
}

/// The broker's text when it refused a declaration for differing arguments.
fn inequivalent(e: &lapin::Error) -> Option<String> {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p)
            if matches!(
                p.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
            ) =>
        {
            Some(p.get_message().to_string())
        }
        _ => None,
    }
}

/// Declares every exchange, queue and binding (idempotent: declaring the same
/// topology again changes nothing).
pub async fn declare_topology(ch: &Channel, cfg: &AmqpConfig) -> Result<(), QueueError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for (name, kind) in [
        (cfg.jobs_exchange.clone(), ExchangeKind::Direct),
        (cfg.dead_letter_exchange(), ExchangeKind::Direct),
        (cfg.results_exchange.clone(), ExchangeKind::Topic),
    ] {
        ch.exchange_declare(name.as_str().into(), kind, durable, FieldTable::default())
            .await
            .map_err(amqp(format!("declare exchange {name}")))?;
    }
    for (queue, key, dlq) in [
        (&cfg.infer_queue, INFER_KEY, cfg.infer_dlq()),
        (&cfg.train_queue, TRAIN_KEY, cfg.train_dlq()),
    ] {
        declare_queue(ch, queue, work_queue_args(cfg, &dlq)).await?;
        ch.queue_bind(
            queue.as_str().into(),
            cfg.jobs_exchange.as_str().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp(format!("bind {queue}")))?;
        // Expired messages go back through the jobs exchange to the work queue.
        let delay = AmqpConfig::delay_queue(queue);
        declare_queue(ch, &delay, quorum_args(&cfg.jobs_exchange, key)).await?;
        declare_dlq(ch, cfg, &dlq).await?;
    }
    Ok(())
}

/// A consumer's own durable queue on an exchange of the topology (the LIS
/// bridge on the results exchange), with the same failure handling as the
/// work queues: a delivery limit, at-least-once dead-lettering into
/// `<queue>.dlq` (through the dead-letter exchange), and a delay queue
/// `<queue>.delay` whose expired messages go back to the queue through the
/// default exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub queue: String,
    pub exchange: String,
    /// Binding keys (topic patterns such as `result.*`).
    pub keys: Vec<String>,
}

impl Subscription {
    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.queue)
    }
}

/// Declares a subscription's queues and bindings (idempotent).
pub async fn declare_subscription(
    ch: &Channel,
    cfg: &AmqpConfig,
    sub: &Subscription,
) -> Result<(), QueueError> {
    let dlq = sub.dlq();
    declare_queue(ch, &sub.queue, work_queue_args(cfg, &dlq)).await?;
    for key in &sub.keys {
        ch.queue_bind(
            sub.queue.as_str().into(),
            sub.exchange.as_str().into(),
            key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp(format!("bind {} to {}", sub.queue, sub.exchange)))?;
    }
    let delay = AmqpConfig::delay_queue(&sub.queue);
    declare_queue(ch, &delay, quorum_args("", &sub.queue)).await?;
    declare_dlq(ch, cfg, &dlq).await
}

/// Arguments of a work queue: quorum, dead-lettering at least once to `dlq`
/// (through the dead-letter exchange) past the delivery limit.
fn work_queue_args(cfg: &AmqpConfig, dlq: &str) -> FieldTable {
    let mut work = quorum_args(&cfg.dead_letter_exchange(), dlq);
    work.insert(
        ShortString::from("x-delivery-limit"),
        AMQPValue::LongInt(cfg.delivery_limit as i32),
    );
    work
}

/// Declares the quarantine queue of `queue` (no binding: copies reach it
/// through the default exchange), with the work queue's delivery limit and
/// dead-lettering into `dlq`.
pub async fn declare_quarantine(
    ch: &Channel,
    cfg: &AmqpConfig,
    queue: &str,
    dlq: &str,
) -> Result<(), QueueError> {
    declare_queue(
        ch,
        &AmqpConfig::quarantine_queue(queue),
        work_queue_args(cfg, dlq),
    )
    .await
}

/// Declares a dead-letter queue and binds it to the dead-letter exchange
/// under its own name.
async fn declare_dlq(ch: &Channel, cfg: &AmqpConfig, dlq: &str) -> Result<(), QueueError> {
    declare_queue(ch, dlq, plain_quorum_args()).await?;
    ch.queue_bind(
        dlq.into(),
        cfg.dead_letter_exchange().as_str().into(),
        dlq.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(amqp(format!("bind {dlq}")))
}

/// Deletes a subscription's queues (test clean-up); absent ones are no error.
pub async fn delete_subscription(ch: &Channel, sub: &Subscription) -> Result<(), QueueError> {
    for q in [
        sub.queue.clone(),
        AmqpConfig::delay_queue(&sub.queue),
        AmqpConfig::quarantine_queue(&sub.queue),
        sub.dlq(),
    ] {
        ch.queue_delete(q.as_str().into(), Default::default())
            .await
            .map_err(amqp(format!("delete queue {q}")))?;
    }
    Ok(())
}

/// Deletes every queue and exchange of the topology (test and benchmark
/// clean-up: quorum queues left behind weigh on a shared broker). Absent ones
/// are no error; the first real failure is returned.
pub async fn delete_topology(ch: &Channel, cfg: &AmqpConfig) -> Result<(), QueueError> {
    for q in [
        cfg.infer_queue.clone(),
        cfg.train_queue.clone(),
        AmqpConfig::delay_queue(&cfg.infer_queue),
        AmqpConfig::delay_queue(&cfg.train_queue),
        AmqpConfig::quarantine_queue(&cfg.infer_queue),
        AmqpConfig::quarantine_queue(&cfg.train_queue),
        cfg.infer_dlq(),
        cfg.train_dlq(),
    ] {
        ch.queue_delete(q.as_str().into(), Default::default())
            .await
            .map_err(amqp(format!("delete queue {q}")))?;
    }
    for x in [
        cfg.jobs_exchange.clone(),
        cfg.dead_letter_exchange(),
        cfg.results_exchange.clone(),
    ] {
        ch.exchange_delete(x.as_str().into(), Default::default())
            .await
            .map_err(amqp(format!("delete exchange {x}")))?;
    }
    Ok(())
}

/// A channel with publisher confirms on.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel, QueueError> {
    let ch = conn.create_channel().await.map_err(amqp("open channel"))?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(amqp("enable publisher confirms"))?;
    Ok(ch)
}

/// The headers a republished copy of a message keeps: the publisher's,
/// without the broker's delivery bookkeeping (`x-delivery-count`,
/// `x-acquired-count`, `x-death` and its summaries, which the broker sets on
/// the copy afresh) and, unless `keep_ours`, without cinflow's own
/// (`x-cinflow-*`: counts and dead-letter reasons).
pub fn republished_headers(headers: Option<&FieldTable>, keep_ours: bool) -> FieldTable {
    let mut out = FieldTable::default();
    for (k, v) in headers.map(|h| h.inner().iter()).into_iter().flatten() {
        let k = k.as_str();
        let brokers = k == "x-delivery-count"
            || k == "x-acquired-count"
            || k.starts_with("x-death")
            || k.starts_with("x-first-death")
            || k.starts_with("x-last-death");
        if !brokers && (keep_ours || !k.starts_with("x-cinflow-")) {
            out.insert(ShortString::from(k), v.clone());
        }
    }
    out
}

/// A message's AMQP `message_id` (the job id), empty when the publisher set none.
pub fn message_id(props: &BasicProperties) -> String {
    props
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default()
}

/// A message to publish with confirms.
#[derive(Debug, Clone, Copy)]
pub struct Publish<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub message_id: &'a str,
    pub payload: &'a [u8],
    /// A message no queue takes is an error, not a silent drop.
    pub mandatory: bool,
    /// Per-message TTL in milliseconds (delay queues).
    pub expiration_ms: Option<u64>,
}

/// Publishes a persistent JSON message and waits for the broker's confirm; a
/// message no queue takes is an error, not a silent drop.
pub async fn publish_json(
    ch: &Channel,
    cfg: &AmqpConfig,
    exchange: &str,
    routing_key: &str,
    message_id: &str,
    payload: &[u8],
    headers: Option<FieldTable>,
) -> Result<(), QueueError> {
    let p = Publish {
        exchange,
        routing_key,
        message_id,
        payload,
        mandatory: true,
        expiration_ms: None,
    };
    publish(ch, cfg, p, headers).await
}

/// Publishes a persistent JSON event and waits for the broker's confirm. Unlike
/// jobs, an event that no queue is bound to is fine: the results are in S3,
/// and a lab may not subscribe to events at all.
pub async fn publish_event(
    ch: &Channel,
    cfg: &AmqpConfig,
    routing_key: &str,
    message_id: &str,
    payload: &[u8],
) -> Result<(), QueueError> {
    let p = Publish {
        exchange: &cfg.results_exchange,
        routing_key,
        message_id,
        payload,
        mandatory: false,
        expiration_ms: None,
    };
    publish(ch, cfg, p, None).await
}

/// Publishes `p` and waits at most `--confirm-timeout-s` for the confirm.
pub async fn publish(
    ch: &Channel,
    cfg: &AmqpConfig,
    p: Publish<'_>,
    headers: Option<FieldTable>,
) -> Result<(), QueueError> {
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(p.message_id.into())
        .with_timestamp(chrono::Utc::now().timestamp().max(0) as u64);
    if let Some(h) = headers {
        props = props.with_headers(h);
    }
    if let Some(ms) = p.expiration_ms {
        props = props.with_expiration(ms.to_string().into());
    }
    let message_id = p.message_id;
    let confirmed = async {
        ch.basic_publish(
            p.exchange.into(),
            p.routing_key.into(),
            BasicPublishOptions {
                mandatory: p.mandatory,
                ..Default::default()
            },
            p.payload,
            props,
        )
        .await
        .map_err(amqp(format!("publish {message_id}")))?
        .await
        .map_err(amqp(format!("confirm {message_id}")))
    };
    let confirm = tokio::time::timeout(cfg.confirm_timeout(), confirmed)
        .await
        .map_err(|_| QueueError::ConfirmTimeout {
            message_id: message_id.to_string(),
            seconds: cfg.confirm_timeout().as_secs(),
        })??;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => Err(QueueError::Unroutable {
            exchange: p.exchange.to_string(),
            routing_key: p.routing_key.to_string(),
            message_id: message_id.to_string(),
        }),
        Confirmation::Nack(_) => Err(QueueError::Nacked {
            message_id: message_id.to_string(),
            what: format!("exchange {:?}, key {}", p.exchange, p.routing_key),
        }),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            super::redact_url("amqp://guest:secret@10.0.0.1:5672/%2f"),
            "amqp://guest:***@10.0.0.1:5672/%2f"
        );
        assert_eq!(super::redact_url("amqp://host/"), "amqp://host/");
    }

    #[tokio::test]
    async fn a_missing_ca_file_or_a_bad_url_is_named() {
        let cfg = super::AmqpConfig {
            url: "amqps://guest:secret@127.0.0.1:5671/%2f".into(),
            jobs_exchange: "j".into(),
            infer_queue: "i".into(),
            train_queue: "t".into(),
            results_exchange: "r".into(),
            delivery_limit: 5,
            confirm_timeout_s: 30,
            heartbeat_s: 30,
            ca_file: Some("/nonexistent/ca.pem".into()),
        };
        let e = super::connect(&cfg, "test").await.unwrap_err().to_string();
        assert!(e.contains("cannot read CA file /nonexistent/ca.pem"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        let bad = super::AmqpConfig {
            url: "not a url".into(),
            ca_file: None,
            ..cfg
        };
        let e = super::connect(&bad, "test").await.unwrap_err().to_string();
        assert!(e.contains("not an AMQP URL"), "{e}");
    }
}
