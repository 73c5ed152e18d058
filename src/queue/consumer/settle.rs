//! Stage 6, settle: the one place that maps how a job ended to what happens
//! to its message.
//!
//! - **Done**: ack.
//! - **Rejected** (the job can never succeed; its error result is written):
//!   republished to the dead-letter queue with the reason, then acked.
//! - **Failed** (this delivery failed in a way that may be the message's
//!   fault: it ran past `--job-timeout-s`, or panicked): a copy with one more
//!   failure counted goes back to its queue, then the original is acked; past
//!   the delivery limit the next delivery is dead-lettered as poison.
//! - **Retry** (transient trouble, an S3 or broker outage, outlasted the retry
//!   budget): a copy goes to the delay queue and comes back to the work queue
//!   when its TTL (`--retry-delay-s`) ends; the original is acked. The job
//!   waits instead of being handed straight back out, and an outage is not
//!   the message's failure: it does not count towards poison. After
//!   `--retry-rounds` such rounds the job is given up (error result,
//!   dead-letter with the reason).
//! - **Wait** (another copy of the job is running): a copy goes to the delay
//!   queue, counted neither as a failure nor as a retry round.
//! - **Given back** (shutdown, drain limit: nothing failed): a copy goes back
//!   to its queue with the counts unchanged, then the original is acked.
//! - **Quarantine** (the message was in flight when a worker died or lost its
//!   connection): a copy goes to the quarantine queue, where each worker
//!   grades one such job at a time, alone in its lane; see the consumer loop.
//! - **Abandoned** (the broker connection is gone): nothing; the broker has
//!   put the message back already.
//!
//! When a copy cannot be published, the original is settled with
//! `basic.reject(requeue)` (a failure, a retry) or `basic.nack(requeue)` (a
//! give-back). Nothing is lost: the original is acked only once its copy is
//! confirmed.
//!
//! **Counting failed deliveries the same way on every broker.** RabbitMQ 4.3
//! changed `x-delivery-count`: it counts failed deliveries only
//! (`basic.reject`, a consumer whose channel closed), while `basic.nack` with
//! requeue does not count and `x-acquired-count` counts every hand-out. Before
//! 4.3, every return counted. So the worker never returns a message through
//! the broker on purpose: every return is a confirmed copy carrying the
//! worker's own counts ([`FAILURES_HEADER`], [`DEATHS_HEADER`],
//! [`RETRIES_HEADER`], [`WAITS_HEADER`], [`DELIVERIES_HEADER`]), and the
//! broker's `x-delivery-count` since the copy was made counts only the
//! deliveries whose consumer vanished (a worker killed, a connection lost),
//! on 3.x as on 4.3. [`Deliveries::of`] adds the two.

use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use super::Broker;
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
/// Rounds through the delay queue waiting for another copy of the job.
pub const WAITS_HEADER: &str = "x-cinflow-waits";
/// Of the failures counted, how many were deliveries whose worker died (or
/// lost its connection) while the job ran alone in the quarantine lane.
pub const DEATHS_HEADER: &str = "x-cinflow-deaths";

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
    /// Another copy of the same job holds its lease (it is running now): to
    /// the delay queue, counted neither as a failure nor as a retry round.
    /// When the copy comes back, the other's result is complete and is
    /// announced again, or the other died and this one takes over.
    Wait { reason: String },
    /// The delivery came back from a worker that died or lost its
    /// connection: to the quarantine queue, where it runs alone.
    Quarantine,
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
    /// Rounds through the delay queue waiting for another copy of the job.
    pub waits: u32,
    /// Of `failed`, deliveries whose worker died or lost its connection.
    pub deaths: u32,
    /// Of `deaths`, those since the last copy: the broker's count.
    pub fresh_deaths: u32,
}

/// Why a copy of a message is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyFor {
    /// To the delay queue after transient failures: one more retry round.
    Retry,
    /// To the delay queue while another copy runs: one more wait.
    Wait,
    /// Back to its queue (drain): nothing added but the delivery.
    GiveBack,
    /// Back to its queue after a failed delivery: one more failure.
    Failed,
    /// To the quarantine queue: the deaths since the last copy are not held
    /// against the job (it may have been innocent, beside the real culprit);
    /// from now on it runs alone, and what happens there counts.
    Quarantine,
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
            waits: get(WAITS_HEADER).unwrap_or(0),
            deaths: get(DEATHS_HEADER).unwrap_or(0) + broker_failed,
            fresh_deaths: broker_failed,
        }
    }

    /// These counts without `k` of the returns since the last copy (the
    /// returns of a job this worker abandoned when its connection dropped:
    /// not the job's fault).
    pub fn forgive(self, k: u32) -> Deliveries {
        let k = k.min(self.fresh_deaths);
        Deliveries {
            failed: self.failed - k,
            deaths: self.deaths - k,
            fresh_deaths: self.fresh_deaths - k,
            ..self
        }
    }

    /// Why a message is poison, in words: all its failures were the worker
    /// dying while it ran alone, or a mix with deadlines and panics.
    pub fn poison_reason(self) -> String {
        if self.deaths >= self.failed {
            format!(
                "the worker died while grading this job {} times (killed, out of memory or its connection lost, each time with the job alone in the quarantine lane); not tried again",
                self.deaths
            )
        } else {
            format!(
                "poison message: {} failed deliveries ({} times the worker died while grading it, {} times it ran past --job-timeout-s or panicked); not tried again",
                self.failed,
                self.deaths,
                self.failed - self.deaths
            )
        }
    }

    /// The headers of a copy made now.
    fn stamp(self, headers: &mut FieldTable, why: CopyFor) {
        let n = |v: u32| AMQPValue::LongLongInt(i64::from(v));
        let (failed, deaths) = match why {
            CopyFor::Failed => (self.failed + 1, self.deaths),
            CopyFor::Quarantine => (
                self.failed - self.fresh_deaths.min(self.failed),
                self.deaths - self.fresh_deaths.min(self.deaths),
            ),
            _ => (self.failed, self.deaths),
        };
        headers.insert(ShortString::from(FAILURES_HEADER), n(failed));
        headers.insert(ShortString::from(DEATHS_HEADER), n(deaths));
        headers.insert(
            ShortString::from(RETRIES_HEADER),
            n(self.retries + u32::from(why == CopyFor::Retry)),
        );
        headers.insert(
            ShortString::from(WAITS_HEADER),
            n(self.waits + u32::from(why == CopyFor::Wait)),
        );
        // A move to quarantine grades nothing: not counted as a delivery.
        let handed = u32::from(why != CopyFor::Quarantine);
        headers.insert(
            ShortString::from(DELIVERIES_HEADER),
            n(self.earlier + handed),
        );
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
    /// The work queue (dead letters name it; the delay queue returns to it).
    pub queue: String,
    /// Where failed and given-back copies go: the queue the delivery came
    /// from (the work queue, or its quarantine queue).
    pub home: String,
    /// The quarantine queue, where deliveries that were in flight when a
    /// worker died go (None: this consumer takes one job at a time, so such
    /// a delivery was alone already).
    pub quarantine: Option<String>,
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
            tracing::warn!(message_id = id, reason = %reason, failures = counts.failed + 1, "job failed: returned to its queue as a failed delivery");
            copy_then_ack(
                delivery,
                counts,
                broker,
                route,
                id,
                CopyFor::Failed,
                Some(&reason),
            )
            .await
        }
        Outcome::Quarantine => {
            tracing::warn!(message_id = id, deaths = counts.fresh_deaths, "the job was in flight when a worker died or lost its connection: to the quarantine lane, where it runs alone");
            copy_then_ack(
                delivery,
                counts,
                broker,
                route,
                id,
                CopyFor::Quarantine,
                None,
            )
            .await
        }
        Outcome::Retry { reason } => {
            tracing::warn!(message_id = id, reason = %reason, retry_in_s = route.retry_delay.as_secs(), round = counts.retries + 1, "job delayed: it comes back after the retry delay");
            copy_then_ack(
                delivery,
                counts,
                broker,
                route,
                id,
                CopyFor::Retry,
                Some(&reason),
            )
            .await
        }
        Outcome::Wait { reason } => {
            tracing::info!(message_id = id, reason = %reason, retry_in_s = route.retry_delay.as_secs(), wait = counts.waits + 1, "job waits: another copy of it is running");
            copy_then_ack(delivery, counts, broker, route, id, CopyFor::Wait, None).await
        }
        Outcome::GiveBack => {
            copy_then_ack(delivery, counts, broker, route, id, CopyFor::GiveBack, None).await
        }
        Outcome::Abandoned => (Ok(true), "abandoned"),
    };
    if let Err(e) = acked {
        // The channel is gone: the broker has already put the message back.
        tracing::warn!(message_id = id, error = %e, "could not settle the job; the broker redelivers it");
    }
    settled
}

impl CopyFor {
    /// The queue the copy goes to.
    fn target(self, route: &Route) -> &str {
        match self {
            CopyFor::Retry | CopyFor::Wait => &route.delay,
            CopyFor::Failed | CopyFor::GiveBack => &route.home,
            CopyFor::Quarantine => route.quarantine.as_deref().unwrap_or(&route.home),
        }
    }

    /// How the message was settled (the `outcome` label of `cinflow_jobs_total`).
    fn label(self) -> &'static str {
        match self {
            CopyFor::Retry => "delayed",
            CopyFor::Wait => "waiting",
            CopyFor::Failed => "failed",
            CopyFor::GiveBack => "returned",
            CopyFor::Quarantine => "quarantined",
        }
    }
}

/// Settles a delivery by a confirmed copy, stamped with its counts, and an
/// ack of the original. If the copy cannot be made the original goes back
/// through the broker: with reject when something failed (every version
/// counts it), with nack when nothing did.
async fn copy_then_ack(
    delivery: &Delivery,
    counts: Deliveries,
    broker: &Broker,
    route: &Route,
    id: &str,
    why: CopyFor,
    last_failure: Option<&str>,
) -> (lapin::Result<bool>, &'static str) {
    let mut headers = republished_headers(delivery.properties.headers().as_ref(), true);
    counts.stamp(&mut headers, why);
    if let Some(reason) = last_failure {
        headers.insert(ShortString::from(LAST_FAILURE_HEADER), text(reason));
    }
    let waits = matches!(why, CopyFor::Retry | CopyFor::Wait);
    let expiration = waits.then_some(route.retry_delay.as_millis() as u64);
    let target = why.target(route);
    match copy(
        delivery,
        broker,
        target,
        id,
        headers,
        expiration,
        route.retry,
    )
    .await
    {
        Ok(()) => (
            delivery.acker.ack(BasicAckOptions::default()).await,
            why.label(),
        ),
        Err(e) if matches!(why, CopyFor::GiveBack | CopyFor::Quarantine) => {
            tracing::warn!(message_id = id, queue = target, error = %e, "cannot copy the job; returning it with nack");
            (delivery.acker.nack(requeue_nack()).await, "requeued")
        }
        Err(e) => {
            tracing::warn!(message_id = id, queue = target, error = %e, "cannot copy the job; returning it with reject");
            (reject(delivery).await, "requeued")
        }
    }
}

fn requeue_nack() -> BasicNackOptions {
    BasicNackOptions {
        requeue: true,
        ..Default::default()
    }
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// A delivery returned through the broker when its copy cannot be made:
/// counted on every broker version.
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
    broker
        .publish_with("publish a copy", retry, |ch| {
            let headers = headers.clone();
            async move { publish(&ch, &broker.cfg, p, Some(headers)).await }
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
    broker
        .publish_with("dead-letter", route.retry, |ch| {
            let headers = headers.clone();
            let (dlx, id) = (&dlx, &id);
            async move {
                crate::queue::publish_json(
                    &ch,
                    &broker.cfg,
                    dlx,
                    &route.dlq,
                    id,
                    &delivery.data,
                    Some(headers),
                )
                .await
            }
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
            waits: 0,
            deaths: 2,
            fresh_deaths: 2,
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
                earlier: 8,
                waits: 0,
                deaths: 2,
                fresh_deaths: 2,
            }
        );
        h.insert("x-delivery-count".into(), AMQPValue::LongInt(-1));
        assert_eq!(Deliveries::of(Some(&h)).failed, 1);
        // A copy to the delay queue: one more round, failures carried over.
        let mut copy = FieldTable::default();
        counts.stamp(&mut copy, CopyFor::Retry);
        assert_eq!(
            Deliveries::of(Some(&copy)),
            Deliveries {
                failed: 3,
                retries: 5,
                earlier: 9,
                waits: 0,
                deaths: 2,
                fresh_deaths: 0,
            }
        );
        // A copy waiting for another copy of the job: neither a failure
        // nor a retry round.
        let mut copy = FieldTable::default();
        counts.stamp(&mut copy, CopyFor::Wait);
        let waited = Deliveries::of(Some(&copy));
        assert_eq!((waited.failed, waited.retries, waited.waits), (3, 4, 1));
        // A copy given back: nothing added but the delivery.
        let mut copy = FieldTable::default();
        counts.stamp(&mut copy, CopyFor::GiveBack);
        assert_eq!(Deliveries::of(Some(&copy)).retries, 4);
        // A failed delivery settled by a copy: one more failure, no death.
        let mut copy = FieldTable::default();
        counts.stamp(&mut copy, CopyFor::Failed);
        let failed = Deliveries::of(Some(&copy));
        assert_eq!((failed.failed, failed.deaths), (4, 2));
        assert!(failed.poison_reason().contains("2 times the worker died"));
        // Into quarantine: the deaths since the last copy are forgiven.
        let mut copy = FieldTable::default();
        counts.stamp(&mut copy, CopyFor::Quarantine);
        let q = Deliveries::of(Some(&copy));
        assert_eq!((q.failed, q.deaths, q.fresh_deaths), (1, 0, 0));
        // Deaths in quarantine are counted by the broker, and carried.
        let mut back = copy.clone();
        back.insert("x-delivery-count".into(), AMQPValue::LongInt(4));
        let q = Deliveries::of(Some(&back));
        assert_eq!((q.failed, q.deaths), (5, 4));
        // A return the worker caused by losing its connection is forgiven.
        let forgiven = Deliveries::of(Some(&back)).forgive(1);
        assert_eq!(
            (forgiven.failed, forgiven.deaths, forgiven.fresh_deaths),
            (4, 3, 3)
        );
        assert_eq!(Deliveries::default().forgive(2), Deliveries::default());
        let mut only_deaths = FieldTable::default();
        only_deaths.insert("x-delivery-count".into(), AMQPValue::LongInt(5));
        assert!(Deliveries::of(Some(&only_deaths))
            .poison_reason()
            .starts_with("the worker died while grading this job 5 times"));
    }
}
