//! The consumer loop both workers share: connect, declare the topology, consume
//! with manual acks and a prefetch, run each delivery's job in its own task,
//! settle it (ack, dead-letter with a reason, or return it to the queue), and
//! reconnect with backoff when the broker goes away. How each outcome is
//! settled is [`super::settle`]'s decision. SIGTERM/SIGINT stop
//! consuming and give in-flight jobs a drain limit; what is unfinished then goes
//! back to the queue unacked when the connection closes.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::settle::{settle, Outcome};
use crate::observe::{health, metrics, InFlight};
use crate::queue::{confirm_channel, connect, declare_topology, AmqpConfig};

/// One received message, as a job handler sees it.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub data: Vec<u8>,
    pub message_id: Option<String>,
    /// Earlier deliveries of this message (quorum queues count them).
    pub delivery_count: u32,
    /// Milliseconds from the publisher's AMQP `timestamp` (one-second
    /// resolution) to receipt, if the publisher set one.
    pub queue_wait_ms: Option<f64>,
    pub received: Instant,
}

/// The broker side a handler may use while a job runs.
#[derive(Clone)]
pub struct Broker {
    pub channel: Channel,
    pub cfg: Arc<AmqpConfig>,
}

impl Broker {
    /// Publishes an event on the results exchange and waits for the confirm
    /// (an exchange with no queue bound takes it too).
    pub async fn publish_event(
        &self,
        routing_key: &str,
        message_id: &str,
        payload: &[u8],
    ) -> Result<(), crate::queue::QueueError> {
        crate::queue::publish_event(
            &self.channel,
            &self.cfg.results_exchange,
            routing_key,
            message_id,
            payload,
        )
        .await
    }
}

/// What a worker does with one message.
pub trait Handler: Send + Sync + 'static {
    /// Runs the job. Failures are part of the [`Outcome`]; a permanent one must
    /// have written its error result before returning `Rejected`.
    fn handle(
        self: Arc<Self>,
        msg: Incoming,
        broker: Broker,
    ) -> impl Future<Output = Outcome> + Send;

    /// A message delivered too often without being settled (the workers that
    /// took it crashed or lost their connection each time): write its error
    /// result; it is dead-lettered with `reason` instead of being tried again.
    fn poison(
        self: Arc<Self>,
        msg: Incoming,
        reason: String,
        broker: Broker,
    ) -> impl Future<Output = Outcome> + Send;
}

/// Where to consume from and how patiently.
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    pub amqp: AmqpConfig,
    pub queue: String,
    pub dlq: String,
    pub prefetch: u16,
    pub drain: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Connection name shown by the broker (`rabbitmqctl list_connections`).
    pub connection_name: String,
}

enum SessionEnd {
    Shutdown,
    Lost(String),
}

/// Consumes until `shutdown` turns true; reconnects after broker failures.
pub async fn run<H: Handler>(
    handler: Arc<H>,
    opts: ConsumeOptions,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut backoff = opts.backoff_min;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let started = Instant::now();
        let end = session(&handler, &opts, &mut shutdown).await;
        health().set_broker_connected(false);
        match end {
            SessionEnd::Shutdown => return Ok(()),
            SessionEnd::Lost(why) => {
                metrics().broker_reconnects.inc();
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = opts.backoff_min;
                }
                tracing::warn!(error = %why, retry_in = ?backoff, "broker connection lost; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
                backoff = (backoff * 2).min(opts.backoff_max);
            }
        }
    }
}

async fn session<H: Handler>(
    handler: &Arc<H>,
    opts: &ConsumeOptions,
    shutdown: &mut watch::Receiver<bool>,
) -> SessionEnd {
    let (conn, ch, broker) = match open(opts).await {
        Ok(x) => x,
        Err(e) => return SessionEnd::Lost(format!("{e:#}")),
    };
    let mut consumer = match ch
        .basic_consume(
            opts.queue.as_str().into(),
            opts.connection_name.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
    {
        Ok(c) => c,
        Err(e) => return SessionEnd::Lost(format!("consume {}: {e}", opts.queue)),
    };
    health().set_broker_connected(true);
    tracing::info!(queue = %opts.queue, prefetch = opts.prefetch, "consuming");
    let mut tasks = JoinSet::new();
    let limit = opts.amqp.delivery_limit;
    let route = Arc::new((opts.queue.clone(), opts.dlq.clone()));
    let end = loop {
        tokio::select! {
            _ = shutdown.changed() => break SessionEnd::Shutdown,
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    tasks.spawn(process(handler.clone(), delivery, broker.clone(), route.clone(), limit));
                }
                Some(Err(e)) => break SessionEnd::Lost(e.to_string()),
                None => break SessionEnd::Lost("the broker cancelled the consumer".into()),
            },
            Some(done) = tasks.join_next() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "job task failed");
                }
            }
        }
    };
    match end {
        SessionEnd::Shutdown => {
            let _ = ch
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await;
            let n = tasks.len();
            tracing::info!(in_flight = n, limit = ?opts.drain, "stopping: draining in-flight jobs");
            let drained = tokio::time::timeout(opts.drain, async {
                while tasks.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                tracing::warn!(
                    unfinished = tasks.len(),
                    "drain limit reached: unfinished jobs go back to the queue"
                );
                tasks.abort_all();
            }
            let _ = conn.close(200, "worker stopping".into()).await;
            SessionEnd::Shutdown
        }
        lost => {
            // Their messages are back in the queue already; let them finish
            // (the objects they write are the ones a redelivery rewrites).
            tasks.detach_all();
            lost
        }
    }
}

async fn open(opts: &ConsumeOptions) -> anyhow::Result<(Connection, Channel, Broker)> {
    let conn = connect(&opts.amqp, &opts.connection_name).await?;
    let ch = conn.create_channel().await?;
    declare_topology(&ch, &opts.amqp).await?;
    ch.basic_qos(opts.prefetch.max(1), BasicQosOptions::default())
        .await?;
    let events = confirm_channel(&conn).await?;
    let broker = Broker {
        channel: events,
        cfg: Arc::new(opts.amqp.clone()),
    };
    Ok((conn, ch, broker))
}

/// Earlier deliveries of a message, from the quorum queue's `x-delivery-count`.
fn delivery_count(headers: Option<&FieldTable>) -> u32 {
    let v = headers.and_then(|h| h.inner().get("x-delivery-count"));
    match v {
        Some(AMQPValue::LongLongInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::LongInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::LongUInt(n)) => *n,
        Some(AMQPValue::ShortInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::ShortUInt(n)) => u32::from(*n),
        Some(AMQPValue::ShortShortInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::ShortShortUInt(n)) => u32::from(*n),
        _ => 0,
    }
}

async fn process<H: Handler>(
    handler: Arc<H>,
    delivery: Delivery,
    broker: Broker,
    route: Arc<(String, String)>,
    limit: u32,
) {
    let _in_flight = InFlight::start();
    let props = &delivery.properties;
    let msg = Incoming {
        data: delivery.data.clone(),
        message_id: props.message_id().as_ref().map(|s| s.to_string()),
        delivery_count: delivery_count(props.headers().as_ref()),
        queue_wait_ms: props.timestamp().map(|ts| {
            let now = chrono::Utc::now().timestamp_millis() as f64;
            (now - ts as f64 * 1e3).max(0.0)
        }),
        received: Instant::now(),
    };
    let id = msg.message_id.clone().unwrap_or_else(|| "-".into());
    if let Some(ms) = msg.queue_wait_ms {
        metrics().queue_wait_seconds.observe(ms / 1e3);
    }
    let received = msg.received;
    let poison = limit > 0 && msg.delivery_count >= limit;
    let outcome = if poison {
        let reason = format!(
            "poison message: delivered {} times without finishing (the workers that took it crashed, were killed or lost their connection, or gave it back after transient failures outlasted their retries); not tried again",
            msg.delivery_count + 1
        );
        std::panic::AssertUnwindSafe(handler.poison(msg, reason, broker.clone()))
            .catch_unwind()
            .await
    } else {
        std::panic::AssertUnwindSafe(handler.handle(msg, broker.clone()))
            .catch_unwind()
            .await
    };
    let outcome = outcome.unwrap_or_else(|panic| Outcome::Retry {
        reason: format!("job panicked: {}", panic_text(&panic)),
    });
    let settled = settle(&delivery, outcome, &broker, &route, &id, poison).await;
    metrics().job_settled(settled);
    metrics()
        .job_seconds
        .observe(received.elapsed().as_secs_f64());
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_count_reads_every_integer_type() {
        assert_eq!(delivery_count(None), 0);
        let mut h = FieldTable::default();
        h.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        assert_eq!(delivery_count(Some(&h)), 3);
        h.insert("x-delivery-count".into(), AMQPValue::LongInt(-1));
        assert_eq!(delivery_count(Some(&h)), 0);
    }
}
