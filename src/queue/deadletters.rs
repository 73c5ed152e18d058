//! The dead-letter queues, for the people who fix what went wrong: list what is
//! there with its reasons, and send messages back to their work queue once the
//! cause is fixed (an image uploaded late, a model alias set).

use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::Channel;

use super::{publish_json, republished_headers, AmqpConfig, QueueError, INFER_KEY, TRAIN_KEY};

/// Header with the reason a message was dead-lettered (set by the workers).
pub const REASON_HEADER: &str = "x-cinflow-reason";
/// Header set on a message sent back from a dead-letter queue: its last reason.
pub const REQUEUED_HEADER: &str = "x-cinflow-requeued-after";
/// Header set on a message sent back from a dead-letter queue: when (RFC 3339).
/// A worker grades such a job again unless its stored result is newer.
pub const REQUEUED_AT_HEADER: &str = "x-cinflow-requeued-at";

/// Which work queue's dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkQueue {
    Infer,
    Train,
    /// The LIS bridge's queue (its name: `--lis-queue`).
    Lis,
}

/// A dead-letter queue and where its messages go back to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterRoute {
    pub dlq: String,
    /// The work queue the messages came from.
    pub queue: String,
    pub exchange: String,
    pub routing_key: String,
}

impl WorkQueue {
    /// The route of this queue's dead letters; `lis_queue`: the bridge's queue.
    pub fn route(self, cfg: &AmqpConfig, lis_queue: &str) -> DeadLetterRoute {
        match self {
            WorkQueue::Infer => DeadLetterRoute {
                dlq: cfg.infer_dlq(),
                queue: cfg.infer_queue.clone(),
                exchange: cfg.jobs_exchange.clone(),
                routing_key: INFER_KEY.into(),
            },
            WorkQueue::Train => DeadLetterRoute {
                dlq: cfg.train_dlq(),
                queue: cfg.train_queue.clone(),
                exchange: cfg.jobs_exchange.clone(),
                routing_key: TRAIN_KEY.into(),
            },
            // Straight back to the bridge's queue (default exchange), not to
            // the results exchange, which would reach every subscriber again.
            WorkQueue::Lis => DeadLetterRoute {
                dlq: format!("{lis_queue}.dlq"),
                queue: lis_queue.to_string(),
                exchange: String::new(),
                routing_key: lis_queue.to_string(),
            },
        }
    }
}

/// One dead-lettered message.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub message_id: String,
    pub reason: String,
    pub dead_lettered_at: String,
    pub body: Vec<u8>,
}

/// A text header's value (empty when absent).
pub fn header_text(headers: Option<&FieldTable>, name: &str) -> String {
    match headers.and_then(|h| h.inner().get(name)) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn amqp(what: &str) -> impl FnOnce(lapin::Error) -> QueueError + '_ {
    move |source| QueueError::Amqp {
        what: what.to_string(),
        source,
    }
}

/// Takes up to `limit` messages off the queue (unacknowledged, on `ch`).
async fn take(
    ch: &Channel,
    queue: &str,
    limit: usize,
) -> Result<Vec<lapin::message::BasicGetMessage>, QueueError> {
    let mut out = Vec::new();
    while out.len() < limit {
        match ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(amqp("read the dead-letter queue"))?
        {
            Some(m) => out.push(m),
            None => break,
        }
    }
    Ok(out)
}

fn describe(m: &lapin::message::BasicGetMessage) -> DeadLetter {
    let p = &m.delivery.properties;
    let h = p.headers().as_ref();
    DeadLetter {
        message_id: super::message_id(p),
        reason: header_text(h, REASON_HEADER),
        dead_lettered_at: header_text(h, "x-cinflow-dead-lettered-at"),
        body: m.delivery.data.clone(),
    }
}

/// Puts messages taken off `dlq` back into it: each as a confirmed copy
/// (headers kept, but for the broker's delivery counts), then the original
/// acked. Returning them with `nack` would count a delivery each time, and
/// quorum queues on RabbitMQ 4.0-4.2 drop a message after 20 (their default
/// delivery limit): listing would lose dead letters. The copies go to the
/// back of the queue, in the order they were taken. `ch` must have
/// publisher confirms on.
async fn give_back(
    ch: &Channel,
    cfg: &AmqpConfig,
    dlq: &str,
    messages: Vec<lapin::message::BasicGetMessage>,
) -> Result<(), QueueError> {
    for m in messages {
        let d = &m.delivery;
        let mut headers = FieldTable::default();
        for (k, v) in d
            .properties
            .headers()
            .as_ref()
            .map(|h| h.inner().iter())
            .into_iter()
            .flatten()
        {
            if k.as_str() != "x-delivery-count" && k.as_str() != "x-acquired-count" {
                headers.insert(k.clone(), v.clone());
            }
        }
        let id = super::message_id(&d.properties);
        let p = super::Publish {
            exchange: "",
            routing_key: dlq,
            message_id: &id,
            payload: &d.data,
            mandatory: true,
            expiration_ms: None,
        };
        super::publish(ch, cfg, p, Some(headers)).await?;
        d.acker.ack(BasicAckOptions::default()).await.map_err(amqp(
            "remove a message copied back to the dead-letter queue",
        ))?;
    }
    Ok(())
}

/// The first `limit` dead letters, left in the queue (moved to its back,
/// see [`give_back`]; listing every message keeps their order). `ch` must
/// have publisher confirms on.
pub async fn list(
    ch: &Channel,
    cfg: &AmqpConfig,
    route: &DeadLetterRoute,
    limit: usize,
) -> Result<Vec<DeadLetter>, QueueError> {
    let taken = take(ch, &route.dlq, limit).await?;
    let out = taken.iter().map(describe).collect();
    give_back(ch, cfg, &route.dlq, taken).await?;
    Ok(out)
}

/// Sends dead letters back to their work queue (all of the first `limit`, or
/// those whose message id is in `ids`), with the broker's and workers' headers
/// removed and the last reason kept in [`REQUEUED_HEADER`]. `ch` must have
/// publisher confirms on; a message leaves the dead-letter queue only after its
/// copy is confirmed. Returns the ids sent back.
pub async fn requeue(
    ch: &Channel,
    cfg: &AmqpConfig,
    route: &DeadLetterRoute,
    ids: &[String],
    limit: usize,
) -> Result<Vec<String>, QueueError> {
    let taken = take(ch, &route.dlq, limit).await?;
    let mut sent = Vec::new();
    let mut keep = Vec::new();
    for m in taken {
        let d = describe(&m);
        if !ids.is_empty() && !ids.contains(&d.message_id) {
            keep.push(m);
            continue;
        }
        let mut headers = republished_headers(m.delivery.properties.headers().as_ref(), false);
        headers.insert(
            ShortString::from(REQUEUED_HEADER),
            AMQPValue::LongString(LongString::from(d.reason.as_str())),
        );
        headers.insert(
            ShortString::from(REQUEUED_AT_HEADER),
            AMQPValue::LongString(LongString::from(
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            )),
        );
        publish_json(
            ch,
            cfg,
            &route.exchange,
            &route.routing_key,
            &d.message_id,
            &d.body,
            Some(headers),
        )
        .await?;
        m.delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(amqp("remove a requeued message from the dead-letter queue"))?;
        sent.push(d.message_id);
    }
    give_back(ch, cfg, &route.dlq, keep).await?;
    Ok(sent)
}
