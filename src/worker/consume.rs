//! The consumer loop both workers share: connect, declare the topology, consume
//! with manual acks and a prefetch, run each delivery's job in its own task
//! under a deadline (`--job-timeout-s`), settle it, and reconnect with backoff
//! when the broker goes away. How each outcome is settled is
//! [`super::settle`]'s decision.
//!
//! Publishing (result events, dead letters, delayed and given-back copies)
//! uses a connection of its own, as RabbitMQ recommends: a publisher the
//! broker blocks (memory or disk alarm) cannot hold up the consumer's acks.
//! Losing either connection ends the session: its jobs are stopped at once
//! (the broker has put their messages back), so after a reconnect no more
//! than `--concurrency` jobs ever run.
//!
//! SIGTERM/SIGINT stop consuming and give in-flight jobs the drain limit;
//! what is unfinished then is given back to the queue without counting a
//! failure.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::settle::{settle, Cause, Deliveries, Outcome, Route};
use crate::observe::{health, metrics, InFlight};
use crate::queue::{amqp, confirm_channel, connect, declare_topology, AmqpConfig, QueueError};
use crate::retry::Transient;

/// One received message, as a job handler sees it.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub data: Vec<u8>,
    pub message_id: Option<String>,
    /// Earlier and failed deliveries of this message.
    pub deliveries: Deliveries,
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
        crate::queue::publish_event(&self.channel, &self.cfg, routing_key, message_id, payload)
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

    /// A message that is not tried again: it failed on too many deliveries
    /// (the workers that took it crashed, were killed or ran past the job
    /// deadline each time), or transient failures outlasted the retry rounds.
    /// Write its error result; it is dead-lettered with `reason`.
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
    /// A subscriber's own queue (the LIS bridge): declared with its delay and
    /// dead-letter queues and bound to an exchange; None for the work queues
    /// of the jobs topology.
    pub subscribe: Option<crate::queue::Subscription>,
    pub prefetch: u16,
    pub drain: Duration,
    /// Longest a job may run before it counts as failed.
    pub job_timeout: Duration,
    /// How long a job waits in the delay queue.
    pub retry_delay: Duration,
    /// Rounds through the delay queue before a job is given up (0: never).
    pub retry_rounds: u32,
    /// How long settling keeps publishing a copy or a dead letter.
    pub settle_retry: crate::retry::RetryPolicy,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Connection name shown by the broker (`rabbitmqctl list_connections`).
    pub connection_name: String,
}

enum SessionEnd {
    Shutdown,
    Lost(String),
    /// Reconnecting cannot help (the queues exist with other arguments).
    Fatal(QueueError),
}

/// Why running jobs are stopped before they finish.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    /// The drain limit passed: give the message back, no failure counted.
    GiveBack,
    /// The connection is gone: the broker has returned the message already.
    Abandon,
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
            SessionEnd::Fatal(e) => return Err(e.into()),
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

/// Both connections of a session.
struct Session {
    consuming: Connection,
    publishing: Connection,
    channel: Channel,
    broker: Broker,
}

impl Session {
    async fn close(&self, why: &str) {
        let _ = self.consuming.close(200, why.into()).await;
        let _ = self.publishing.close(200, why.into()).await;
    }
}

async fn session<H: Handler>(
    handler: &Arc<H>,
    opts: &ConsumeOptions,
    shutdown: &mut watch::Receiver<bool>,
) -> SessionEnd {
    let s = match open(opts).await {
        Ok(s) => s,
        Err(e) if !e.is_transient() => return SessionEnd::Fatal(e),
        Err(e) => return SessionEnd::Lost(e.to_string()),
    };
    let mut consumer = match s
        .channel
        .basic_consume(
            opts.queue.as_str().into(),
            opts.connection_name.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
    {
        Ok(c) => c,
        Err(e) => {
            s.close("cannot consume").await;
            return SessionEnd::Lost(format!("consume {}: {e}", opts.queue));
        }
    };
    let mut publisher_events = s.publishing.events_listener();
    health().set_broker_connected(true);
    tracing::info!(queue = %opts.queue, prefetch = opts.prefetch, "consuming");
    let mut tasks = JoinSet::new();
    let (stop, stopped) = watch::channel(None::<Stop>);
    let job = Arc::new(JobContext {
        broker: s.broker.clone(),
        route: Route {
            queue: opts.queue.clone(),
            dlq: opts.dlq.clone(),
            delay: AmqpConfig::delay_queue(&opts.queue),
            retry_delay: opts.retry_delay,
            retry: opts.settle_retry,
        },
        limit: opts.amqp.delivery_limit,
        retry_rounds: opts.retry_rounds,
        timeout: opts.job_timeout,
        stopped,
    });
    let end = loop {
        tokio::select! {
            _ = shutdown.changed() => break SessionEnd::Shutdown,
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    tasks.spawn(process(handler.clone(), delivery, job.clone()));
                }
                Some(Err(e)) => break SessionEnd::Lost(e.to_string()),
                None => break SessionEnd::Lost("the broker cancelled the consumer".into()),
            },
            Some(event) = publisher_events.next() => match event {
                lapin::Event::Error(e) => break SessionEnd::Lost(format!("publishing connection: {e}")),
                lapin::Event::ConnectionBlocked(why) => {
                    tracing::warn!(reason = %why, "the broker blocks publishing (resource alarm); results wait, acks go on");
                }
                lapin::Event::ConnectionUnblocked => tracing::info!("the broker unblocked publishing"),
                _ => {}
            },
            Some(done) = tasks.join_next() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "job task failed");
                }
            }
        }
    };
    // Not ready from the moment the session ends: a probe must not see a
    // worker as ready while it stops its jobs (up to the settle limit).
    health().set_broker_connected(false);
    match end {
        SessionEnd::Shutdown => {
            let _ = s
                .channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await;
            let n = tasks.len();
            tracing::info!(in_flight = n, limit = ?opts.drain, "stopping: draining in-flight jobs");
            if !finish(&mut tasks, opts.drain).await {
                tracing::warn!(
                    unfinished = tasks.len(),
                    "drain limit reached: unfinished jobs go back to the queue"
                );
                let _ = stop.send(Some(Stop::GiveBack));
                finish_or_abort(&mut tasks, settle_limit(opts)).await;
            }
            s.close("worker stopping").await;
            SessionEnd::Shutdown
        }
        lost => {
            // The broker has put their messages back: stop them now, so no
            // more than --concurrency jobs run after the reconnect.
            let _ = stop.send(Some(Stop::Abandon));
            finish_or_abort(&mut tasks, settle_limit(opts)).await;
            s.close("connection lost").await;
            lost
        }
    }
}

/// Longest a stopped job takes to settle (one confirmed publish and an ack).
fn settle_limit(opts: &ConsumeOptions) -> Duration {
    Duration::from_secs(opts.amqp.confirm_timeout_s.max(1) + 5)
}

/// Waits up to `limit` for every task; whether all finished.
async fn finish(tasks: &mut JoinSet<()>, limit: Duration) -> bool {
    tokio::time::timeout(limit, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_ok()
}

async fn finish_or_abort(tasks: &mut JoinSet<()>, limit: Duration) {
    if !finish(tasks, limit).await {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

async fn open(opts: &ConsumeOptions) -> Result<Session, QueueError> {
    let consuming = connect(&opts.amqp, &opts.connection_name).await?;
    let channel = consuming
        .create_channel()
        .await
        .map_err(amqp("open channel"))?;
    declare_topology(&channel, &opts.amqp).await?;
    if let Some(sub) = &opts.subscribe {
        crate::queue::declare_subscription(&channel, &opts.amqp, sub).await?;
    }
    channel
        .basic_qos(opts.prefetch.max(1), BasicQosOptions::default())
        .await
        .map_err(amqp("set the prefetch"))?;
    let publishing = connect(
        &opts.amqp,
        &format!("{} (publishing)", opts.connection_name),
    )
    .await?;
    let events = confirm_channel(&publishing).await?;
    let broker = Broker {
        channel: events,
        cfg: Arc::new(opts.amqp.clone()),
    };
    Ok(Session {
        consuming,
        publishing,
        channel,
        broker,
    })
}

/// What every job of a session shares.
struct JobContext {
    broker: Broker,
    route: Route,
    /// Failed deliveries after which a message is poison (0: no limit).
    limit: u32,
    retry_rounds: u32,
    timeout: Duration,
    stopped: watch::Receiver<Option<Stop>>,
}

async fn process<H: Handler>(handler: Arc<H>, delivery: Delivery, cx: Arc<JobContext>) {
    let _in_flight = InFlight::start();
    let props = &delivery.properties;
    let msg = Incoming {
        data: delivery.data.clone(),
        message_id: props.message_id().as_ref().map(|s| s.to_string()),
        deliveries: Deliveries::of(props.headers().as_ref()),
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
    let counts = msg.deliveries;
    let poison = cx.limit > 0 && counts.failed >= cx.limit;
    let broker = cx.broker.clone();
    let again = msg.clone();
    let work = async {
        if poison {
            let reason = format!(
                "poison message: {} failed deliveries (the workers that took it crashed, were killed, lost their connection or ran past --job-timeout-s); not tried again",
                counts.failed
            );
            std::panic::AssertUnwindSafe(handler.clone().poison(msg, reason, broker))
                .catch_unwind()
                .await
        } else {
            std::panic::AssertUnwindSafe(handler.clone().handle(msg, broker))
                .catch_unwind()
                .await
        }
    };
    let mut stopped = cx.stopped.clone();
    let outcome = tokio::select! {
        done = tokio::time::timeout(cx.timeout, work) => match done {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(panic)) => Outcome::Failed {
                reason: format!("job panicked: {}", panic_text(&panic)),
            },
            Err(_) => Outcome::Failed {
                reason: format!(
                    "job did not finish within {} s (--job-timeout-s)",
                    cx.timeout.as_secs()
                ),
            },
        },
        stop = stopped.wait_for(Option::is_some) => match stop.map(|s| *s) {
            Ok(Some(Stop::GiveBack)) => Outcome::GiveBack,
            _ => Outcome::Abandoned,
        },
    };
    let (outcome, cause) = match outcome {
        Outcome::Retry { reason }
            if cx.retry_rounds > 0 && counts.retries + 1 >= cx.retry_rounds =>
        {
            let reason = format!(
                "gave up: transient failures outlasted the retries {} times (--retry-rounds); the last: {reason}",
                counts.retries + 1
            );
            (
                handler.poison(again, reason, cx.broker.clone()).await,
                Cause::GaveUp,
            )
        }
        o if poison => (o, Cause::Poison),
        o => (o, Cause::Rejected),
    };
    let settled = settle(
        &delivery, counts, outcome, &cx.broker, &cx.route, &id, cause,
    )
    .await;
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
