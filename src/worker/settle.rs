//! Stage 6, settle: the one place that maps how a job ended to what happens
//! to its message.
//!
//! - **Done**: ack.
//! - **Rejected** (the job can never succeed; its error result is written):
//!   republished to the dead-letter queue with the reason, then acked.
//! - **Failed** (this delivery failed in a way that may be the message's
//!   fault: it ran past `--job-timeout-s`, or panicked): `basic.reject` with
//!   requeue, which the broker counts as a failed delivery on every version;
//!   past the delivery limit the next delivery is dead-lettered as poison.
//! - **Retry** (transient trouble, an S3 or broker outage, outlasted the retry
//!   budget): a copy goes to the delay queue and comes back to the work queue
//!   when its TTL (`--retry-delay-s`) ends; the original is acked. The job
//!   waits instead of being handed straight back out, and an outage is not
//!   the message's failure: it does not count towards poison. After
//!   `--retry-rounds` such rounds the job is given up (error result,
//!   dead-letter with the reason).
//! - **Given back** (shutdown, drain limit: nothing failed): a copy goes back
//!   to the work queue with the counts unchanged, then the original is acked.
//! - **Abandoned** (the broker connection is gone): nothing; the broker has
//!   put the message back already.
//!
//! When a copy cannot be published, the original is settled with
//! `basic.reject(requeue)` (a retry) or `basic.nack(requeue)` (a give-back).
//! Nothing is lost: the original is acked only once its copy is confirmed.
//!
//! **Counting failed deliveries the same way on every broker.** RabbitMQ 4.3
//! changed `x-delivery-count`: it counts failed deliveries only
//! (`basic.reject`, a consumer whose channel closed), while `basic.nack` with
//! requeue does not count and `x-acquired-count` counts every hand-out. Before
//! 4.3, every return counted. So the worker returns messages without failure
//! by republishing copies, never by nack (which 3.x would count), and settles
//! real failures with reject (which every version counts). The copies carry
//! the worker's own counts ([`FAILURES_HEADER`], [`RETRIES_HEADER`],
//! [`DELIVERIES_HEADER`]); [`Deliveries::of`] adds the broker's counts since
//! the copy was made. A drain never adds a failure, so a job returned by
//! drains is never taken for poison, on 3.x as on 4.3.

use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use super::consume::Broker;
use crate::observe::metrics;
use crate::queue::{publish, republished_headers, Publish, QueueError};
use crate::retry::{RetryPolicy, Transient};

pub use crate::queue::deadletters::REASON_HEADER;

/// Failed deliveries before this copy was made (the worker's own count).
pub const FAILURES_HEADER: &str = "x-cinflow-failures";
/// Rounds through the delay queue so far.
pub const RETRIES_HEADER: &str = "x-cinflow-retries";
/// Deliveries before this copy was made (the worker's own count).
pub const DELIVERIES_HEADER: &str = "x-cinflow-deliveries";
/// Why the last delivery failed (on copies in the delay queue).
pub const LAST_FAILURE_HEADER: &str = "x-cinflow-last-failure";

/// How a job ended; it decides how the message is settled.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Everything written and announced: ack.
    Done,
    /// Can never succeed (bad message or bad input): the error result is written;
    /// the message goes to the dead-letter queue with the reason, then is acked.
    Rejected { reason: String },
    /// This delivery failed (deadline, panic): returned with reject, counted.
    Failed { reason: String },
    /// Transient trouble outlasted the retry budget: to the delay queue.
    Retry { reason: String },
    /// Not finished for a reason that is not the job's (shutdown, drain
    /// limit): back to the work queue, no failure counted.
    GiveBack,
    /// The broker connection is gone: the broker has returned the message.
    Abandoned,
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

/// How often a message was handed out and how often that failed, counted
/// the same way on every broker version (module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deliveries {
    /// Failed deliveries before this one.
    pub failed: u32,
    /// Rounds through the delay queue before this delivery.
    pub retries: u32,
    /// Deliveries before this one.
    pub earlier: u32,
}

impl Deliveries {
    /// From a delivery's headers: the worker's counts on the copy plus the
    /// broker's since the copy was made.
    pub fn of(headers: Option<&FieldTable>) -> Deliveries {
        let get = |k: &str| headers.and_then(|h| h.inner().get(k)).and_then(count);
        let broker_failed = get("x-delivery-count").unwrap_or(0);
        // 4.3+: every hand-out; before 4.3 only x-delivery-count exists.
        let broker_handed = get("x-acquired-count").unwrap_or(0).max(broker_failed);
        Deliveries {
            failed: get(FAILURES_HEADER).unwrap_or(0) + broker_failed,
            retries: get(RETRIES_HEADER).unwrap_or(0),
            earlier: get(DELIVERIES_HEADER).unwrap_or(0) + broker_handed,
        }
    }

    /// The headers of a copy made now; `retry`: it goes to the delay queue.
    fn stamp(self, headers: &mut FieldTable, retry: bool) {
        let n = |v: u32| AMQPValue::LongLongInt(i64::from(v));
        headers.insert(ShortString::from(FAILURES_HEADER), n(self.failed));
        headers.insert(
            ShortString::from(RETRIES_HEADER),
            n(self.retries + u32::from(retry)),
        );
        headers.insert(ShortString::from(DELIVERIES_HEADER), n(self.earlier + 1));
    }
}

/// A header's integer value, whatever integer type the broker used.
fn count(v: &AMQPValue) -> Option<u32> {
    let n: i64 = match v {
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        _ => return None,
    };
    Some(n.clamp(0, i64::from(u32::MAX)) as u32)
}

/// The queues a consumer settles into.
#[derive(Debug, Clone)]
pub struct Route {
    pub queue: String,
    pub dlq: String,
    pub delay: String,
    /// How long a job waits in the delay queue.
    pub retry_delay: Duration,
    /// How long a copy or a dead letter keeps being published (a broker that
    /// blocks publishers, a confirm that does not come) before the original is
    /// returned with reject or nack.
    pub retry: RetryPolicy,
}

/// Why a message is dead-lettered (the `cause` label of
/// `cinflow_dead_letters_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Its content can never be graded.
    Rejected,
    /// It failed on every delivery up to the delivery limit.
    Poison,
    /// Transient failures outlasted `--retry-rounds` rounds.
    GaveUp,
}

impl Cause {
    pub fn label(self) -> &'static str {
        match self {
            Cause::Rejected => "rejected",
            Cause::Poison => "poison",
            Cause::GaveUp => "gave_up",
        }
    }
}

/// Settles `delivery` as `outcome` says; `cause`: why a rejection is one.
/// Returns how it was settled (the `outcome` label of `cinflow_jobs_total`).
pub async fn settle(
    delivery: &Delivery,
    counts: Deliveries,
    outcome: Outcome,
    broker: &Broker,
    route: &Route,
    id: &str,
    cause: Cause,
) -> &'static str {
    let (acked, settled) = match outcome {
        Outcome::Done => (delivery.acker.ack(BasicAckOptions::default()).await, "done"),
        Outcome::Rejected { reason } => {
            tracing::warn!(message_id = id, reason = %reason, "job rejected: dead-lettered");
            match dead_letter(delivery, broker, route, &reason).await {
                Ok(()) => {
                    metrics().dead_lettered(cause.label());
                    (
                        delivery.acker.ack(BasicAckOptions::default()).await,
                        cause.label(),
                    )
                }
                Err(e) => {
                    tracing::error!(message_id = id, error = %e, "cannot dead-letter; returning the job to the queue");
                    (reject(delivery).await, "requeued")
                }
            }
        }
        Outcome::Failed { reason } => {
            tracing::warn!(message_id = id, reason = %reason, failures = counts.failed + 1, "job failed: returned to the queue as a failed delivery");
            (reject(delivery).await, "failed")
        }
        Outcome::Retry { reason } => {
            let mut headers = republished_headers(delivery.properties.headers().as_ref(), true);
            counts.stamp(&mut headers, true);
            headers.insert(ShortString::from(LAST_FAILURE_HEADER), text(&reason));
            let delay = route.retry_delay.as_millis() as u64;
            match copy(
                delivery,
                broker,
                &route.delay,
                id,
                headers,
                Some(delay),
                route.retry,
            )
            .await
            {
                Ok(()) => {
                    tracing::warn!(message_id = id, reason = %reason, retry_in_s = delay / 1000, round = counts.retries + 1, "job delayed: it comes back after the retry delay");
                    (
                        delivery.acker.ack(BasicAckOptions::default()).await,
                        "delayed",
                    )
                }
                Err(e) => {
                    tracing::warn!(message_id = id, reason = %reason, error = %e, "job failed; the delay queue cannot take it: returned to the queue");
                    (reject(delivery).await, "requeued")
                }
            }
        }
        Outcome::GiveBack => {
            let mut headers = republished_headers(delivery.properties.headers().as_ref(), true);
            counts.stamp(&mut headers, false);
            match copy(
                delivery,
                broker,
                &route.queue,
                id,
                headers,
                None,
                route.retry,
            )
            .await
            {
                Ok(()) => (
                    delivery.acker.ack(BasicAckOptions::default()).await,
                    "returned",
                ),
                Err(e) => {
                    tracing::warn!(message_id = id, error = %e, "cannot copy the job back to its queue; returning it with nack");
                    let nack = BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    };
                    (delivery.acker.nack(nack).await, "returned")
                }
            }
        }
        Outcome::Abandoned => (Ok(true), "abandoned"),
    };
    if let Err(e) = acked {
        // The channel is gone: the broker has already put the message back.
        tracing::warn!(message_id = id, error = %e, "could not settle the job; the broker redelivers it");
    }
    settled
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// A delivery returned at once as failed: counted on every broker version.
async fn reject(delivery: &Delivery) -> lapin::Result<bool> {
    delivery
        .acker
        .reject(BasicRejectOptions { requeue: true })
        .await
}

/// Publishes a copy of the message to `queue` (default exchange), confirmed.
async fn copy(
    delivery: &Delivery,
    broker: &Broker,
    queue: &str,
    id: &str,
    headers: FieldTable,
    expiration_ms: Option<u64>,
    retry: RetryPolicy,
) -> Result<(), QueueError> {
    let p = Publish {
        exchange: "",
        routing_key: queue,
        message_id: id,
        payload: &delivery.data,
        mandatory: true,
        expiration_ms,
    };
    retry
        .run("publish a copy", || {
            publish(&broker.channel, &broker.cfg, p, Some(headers.clone()))
        })
        .await
}

/// Republishes the message to the dead-letter queue with the reason (and the
/// original headers), waiting for the broker's confirm.
async fn dead_letter(
    delivery: &Delivery,
    broker: &Broker,
    route: &Route,
    reason: &str,
) -> Result<(), QueueError> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(ShortString::from(REASON_HEADER), text(reason));
    headers.insert(ShortString::from("x-cinflow-queue"), text(&route.queue));
    headers.insert(
        ShortString::from("x-cinflow-dead-lettered-at"),
        text(&chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
    );
    let id = crate::queue::message_id(&delivery.properties);
    let dlx = broker.cfg.dead_letter_exchange();
    route
        .retry
        .run("dead-letter", || {
            crate::queue::publish_json(
                &broker.channel,
                &broker.cfg,
                &dlx,
                &route.dlq,
                &id,
                &delivery.data,
                Some(headers.clone()),
            )
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_add_the_workers_count_to_the_brokers() {
        assert_eq!(Deliveries::of(None), Deliveries::default());
        let mut h = FieldTable::default();
        h.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        let two = Deliveries {
            failed: 2,
            retries: 0,
            earlier: 2,
        };
        assert_eq!(Deliveries::of(Some(&h)), two);
        // RabbitMQ 4.3: nacked hand-outs show in x-acquired-count only.
        h.insert("x-acquired-count".into(), AMQPValue::LongLongInt(5));
        h.insert(FAILURES_HEADER.into(), AMQPValue::LongLongInt(1));
        h.insert(RETRIES_HEADER.into(), AMQPValue::ShortInt(4));
        h.insert(DELIVERIES_HEADER.into(), AMQPValue::LongInt(3));
        let counts = Deliveries::of(Some(&h));
        assert_eq!(
            counts,
            Deliveries {
                failed: 3,
                retries: 4,
                earlier: 8
            }
        );
        h.insert("x-delivery-count".into(), AMQPValue::LongInt(-1));
        assert_eq!(Deliveries::of(Some(&h)).failed, 1);
        // A copy to the delay queue: one more round, failures carried over.
        let mut copy = FieldTable::default();
        counts.stamp(&mut copy, true);
        assert_eq!(
            Deliveries::of(Some(&copy)),
            Deliveries {
                failed: 3,
                retries: 5,
                earlier: 9
            }
        );
        // A copy given back: nothing added but the delivery.
        let mut copy = FieldTable::default();
        counts.stamp(&mut copy, false);
        assert_eq!(Deliveries::of(Some(&copy)).retries, 4);
    }
}
