//! Stage 6, settle: the one place that maps how a job ended to what happens
//! to its message. Done: ack. Rejected (the job can never succeed; its error
//! result is written): republished to the dead-letter queue with the reason,
//! then acked. Retry (transient trouble outlasted the retry budget): returned
//! to the queue. If the dead-letter queue cannot take the message, it goes
//! back to the queue instead: nothing is lost.

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, LongString, ShortString};

use super::consume::Broker;
use crate::observe::metrics;
use crate::queue::publish_json;
use crate::retry::Transient;

pub use crate::queue::deadletters::REASON_HEADER;

/// How a job ended; it decides how the message is settled.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Everything written and announced: ack.
    Done,
    /// Can never succeed (bad message or bad input): the error result is written;
    /// the message goes to the dead-letter queue with the reason, then is acked.
    Rejected { reason: String },
    /// Transient trouble outlasted the retry budget: back to the queue.
    Retry { reason: String },
}

impl Outcome {
    /// A failure that is left after the step's own retries: a transient one
    /// returns the job to the queue, a permanent one refuses it (the caller
    /// writes its error result first).
    pub fn of_failure(e: &impl Transient) -> Outcome {
        let reason = e.to_string();
        if e.is_transient() {
            Outcome::Retry { reason }
        } else {
            Outcome::Rejected { reason }
        }
    }
}

/// `route`: the queue consumed and its dead-letter queue; `poison`: the
/// message came past the delivery limit. Returns how it was settled (the
/// `outcome` label of `cinflow_jobs_total`).
pub async fn settle(
    delivery: &Delivery,
    outcome: Outcome,
    broker: &Broker,
    route: &(String, String),
    id: &str,
    poison: bool,
) -> &'static str {
    let (acked, settled) = match outcome {
        Outcome::Done => (delivery.acker.ack(BasicAckOptions::default()).await, "done"),
        Outcome::Rejected { reason } => {
            tracing::warn!(message_id = id, reason = %reason, "job rejected: dead-lettered");
            match dead_letter(delivery, broker, route, &reason).await {
                Ok(()) => {
                    let cause = if poison { "poison" } else { "rejected" };
                    metrics().dead_lettered(cause);
                    (delivery.acker.ack(BasicAckOptions::default()).await, cause)
                }
                Err(e) => {
                    tracing::error!(message_id = id, error = %e, "cannot dead-letter; returning the job to the queue");
                    (delivery.acker.nack(requeue()).await, "requeued")
                }
            }
        }
        Outcome::Retry { reason } => {
            tracing::warn!(message_id = id, reason = %reason, "job returned to the queue");
            (delivery.acker.nack(requeue()).await, "requeued")
        }
    };
    if let Err(e) = acked {
        // The channel is gone: the broker has already put the message back.
        tracing::warn!(message_id = id, error = %e, "could not settle the job; the broker redelivers it");
    }
    settled
}

fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        requeue: true,
        ..Default::default()
    }
}

/// Republishes the message to the dead-letter queue with the reason (and the
/// original headers), waiting for the broker's confirm.
async fn dead_letter(
    delivery: &Delivery,
    broker: &Broker,
    (queue, dlq): &(String, String),
    reason: &str,
) -> Result<(), crate::queue::QueueError> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    headers.insert(ShortString::from(REASON_HEADER), text(reason));
    headers.insert(ShortString::from("x-cinflow-queue"), text(queue));
    headers.insert(
        ShortString::from("x-cinflow-dead-lettered-at"),
        text(&chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
    );
    let id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default();
    publish_json(
        &broker.channel,
        &broker.cfg.dead_letter_exchange(),
        dlq,
        &id,
        &delivery.data,
        Some(headers),
    )
    .await
}
