//! The consumer loop both workers share: connect, declare the topology, consume
//! with manual acks and a prefetch, run each delivery's job in its own task
//! under a deadline (`--job-timeout-s`), settle it, and reconnect with backoff
//! when the broker goes away. How each outcome is settled is
//! [`settle`]'s decision.
//!
//! Publishing (result events, dead letters, delayed and given-back copies)
//! uses a connection of its own, as RabbitMQ recommends: a publisher the
//! broker blocks (memory or disk alarm) cannot hold up the consumer's acks.
//! While the broker blocks publishing, or while a dropped publishing
//! connection is opened again, publishes wait instead of failing and a job's
//! deadline waits with them ([`Broker::publish_with`]): neither is the job's
//! fault, so neither costs it a delivery. Losing the consuming connection
//! ends the session: its jobs are stopped at once (the broker has put their
//! messages back), so after a reconnect no more than `--concurrency` jobs
//! ever run.
//!
//! Handlers hold a lease ([`Broker::lease`], [`super::lease`]) on what they
//! must do once at a time (a job, a result's delivery to the LIS); a copy
//! that finds it taken returns [`Outcome::Wait`] and waits in the delay
//! queue.
//!
//! SIGTERM/SIGINT stop consuming and give in-flight jobs the drain limit;
//! what is unfinished then is given back to the queue without counting a
//! failure.

mod config;
pub mod settle;

pub use config::ConsumerConfig;

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

use super::{amqp, confirm_channel, connect, declare_topology, AmqpConfig, QueueError};
use crate::observe::{health, metrics, InFlight};
use crate::retry::{RetryPolicy, Transient};
use settle::{settle, Cause, Deliveries, Outcome, Route};

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
    /// When `cinflow dead-letters requeue` sent it back, if it did.
    pub requeued_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The broker side a handler may use while a job runs.
#[derive(Clone)]
pub struct Broker {
    pub cfg: Arc<AmqpConfig>,
    /// The publishing connection's channel and state.
    publishing: Arc<Publishing>,
    /// How long one publish keeps retrying while the broker is reachable.
    retry: RetryPolicy,
    /// Leases on the consuming connection: they live and die with it, as
    /// the deliveries they guard do.
    leases: super::lease::Leases,
    /// The queue consumed, which names its leases.
    queue: Arc<str>,
    /// The lease this delivery holds (each delivery has its own [`Broker`]):
    /// released by the consumer loop before the delivery is settled, also
    /// when the job was stopped at its deadline or panicked while holding it.
    held: Arc<tokio::sync::Mutex<Option<super::lease::Lease>>>,
}

/// Whether publishing can go ahead now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PublishState {
    Open,
    /// The broker blocks publishers (a memory or disk alarm).
    Blocked,
    /// The publishing connection is gone and is being opened again.
    Down,
}

/// The publishing side of a session: a confirm channel, replaced when its
/// connection drops (the consuming connection, and with it every delivery
/// in flight, stays), and whether publishing can go ahead now.
struct Publishing {
    channel: std::sync::RwLock<Channel>,
    state: watch::Sender<PublishState>,
}

impl Broker {
    /// Tries to take the lease on `id` (a job id, a result id) among the
    /// consumers of this queue: `None` while another holds it. See
    /// [`super::lease`].
    async fn lease(&self, id: &str) -> Result<Option<super::lease::Lease>, QueueError> {
        let name = format!("{}.lease.{id}", self.queue);
        self.leases.try_take(&name).await
    }

    /// Runs `work` holding the lease on `id`. A copy that finds the lease
    /// taken does nothing and waits in the delay queue ([`Outcome::Wait`]);
    /// `what` names the thing in the wait's reason (`job J`).
    pub async fn leased(
        &self,
        id: &str,
        what: &str,
        work: impl Future<Output = Outcome>,
    ) -> Outcome {
        match self.lease(id).await {
            Ok(Some(lease)) => {
                *self.held.lock().await = Some(lease);
                let outcome = work.await;
                self.release_held().await;
                outcome
            }
            Ok(None) => Outcome::Wait {
                reason: format!("another copy of {what} is being processed now"),
            },
            Err(e) => Outcome::of_failure(&e),
        }
    }

    /// A handle for one delivery: the same connections, its own lease slot.
    fn for_delivery(&self) -> Broker {
        Broker {
            held: Arc::default(),
            ..self.clone()
        }
    }

    /// Releases the lease this delivery holds, if any.
    async fn release_held(&self) {
        let lease = self.held.lock().await.take();
        if let Some(lease) = lease {
            lease.release().await;
        }
    }

    /// The publishing channel now (publisher confirms on).
    pub fn channel(&self) -> Channel {
        self.publishing
            .channel
            .read()
            .expect("channel lock")
            .clone()
    }

    /// Whether publishing is held up by the broker (an alarm) or by a
    /// publishing connection being opened again: no fault of any job.
    pub fn held_up(&self) -> bool {
        *self.publishing.state.borrow() != PublishState::Open
    }

    /// Waits until publishing can go ahead.
    pub async fn open(&self) {
        let mut rx = self.publishing.state.subscribe();
        let _ = rx.wait_for(|s| *s == PublishState::Open).await;
    }

    /// Runs one publish (`op` gets the channel of the moment), retried per
    /// `--retry-for-s` while the broker is reachable, and never given up
    /// while the broker blocks publishing or the publishing connection is
    /// being opened again: those are no fault of the message, and give-ups
    /// would count against it.
    pub async fn publish_with<T, F, Fut>(
        &self,
        what: &str,
        retry: RetryPolicy,
        op: F,
    ) -> Result<T, QueueError>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T, QueueError>>,
    {
        loop {
            self.open().await;
            match retry.run(what, || op(self.channel())).await {
                Err(e) if e.is_transient() && self.held_up() => {
                    tracing::info!(error = %e, "{what}: publishing is held up by the broker; waiting, not counting it");
                }
                other => return other,
            }
        }
    }

    /// Publishes an event on the results exchange and waits for the confirm
    /// (an exchange with no queue bound takes it too).
    pub async fn publish_event(
        &self,
        routing_key: &str,
        message_id: &str,
        payload: &[u8],
    ) -> Result<(), QueueError> {
        self.publish_with("publish an event", self.retry, |ch| async move {
            crate::queue::publish_event(&ch, &self.cfg, routing_key, message_id, payload).await
        })
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
    let returns = Arc::new(std::sync::Mutex::new(Returns::default()));
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let started = Instant::now();
        let end = session(&handler, &opts, &mut shutdown, &returns).await;
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
    consuming: Arc<Connection>,
    channel: Channel,
    /// The quarantine lane's channel (prefetch 1), when jobs run several at once.
    quarantine: Option<Channel>,
    broker: Broker,
    /// The task keeping the publishing connection ([`keep_publishing`]),
    /// and the signal that ends it.
    publisher: tokio::task::JoinHandle<()>,
    end_publishing: watch::Sender<bool>,
}

impl Session {
    async fn close(self, why: &str) {
        let _ = self.consuming.close(200, why.into()).await;
        let _ = self.end_publishing.send(true);
        let _ = self.publisher.await;
    }
}

/// Opens the publishing connection and its confirm channel.
async fn open_publishing(opts: &ConsumeOptions) -> Result<(Connection, Channel), QueueError> {
    let name = format!("{} (publishing)", opts.connection_name);
    let conn = connect(&opts.amqp, &name).await?;
    let ch = confirm_channel(&conn).await?;
    Ok((conn, ch))
}

/// Keeps a session's publishing connection: tells publishers when the
/// broker blocks them (a memory or disk alarm) and when it lets them go on,
/// and opens the connection again, with backoff, when it drops. The
/// consuming connection is untouched, so the jobs in flight keep their
/// deliveries: a dropped publishing connection costs no job a delivery.
async fn keep_publishing(
    opts: ConsumeOptions,
    mut conn: Connection,
    publishing: Arc<Publishing>,
    mut end: watch::Receiver<bool>,
) {
    loop {
        let mut events = conn.events_listener();
        let why = loop {
            tokio::select! {
                _ = end.changed() => {
                    let _ = conn.close(200, "session ends".into()).await;
                    return;
                }
                event = events.next() => match event {
                    Some(lapin::Event::Error(e)) => break e.to_string(),
                    Some(lapin::Event::ConnectionBlocked(why)) => {
                        tracing::warn!(reason = %why, "the broker blocks publishing (resource alarm); results and settling wait, acks go on, nothing counts against the jobs");
                        publishing.state.send_replace(PublishState::Blocked);
                    }
                    Some(lapin::Event::ConnectionUnblocked) => {
                        tracing::info!("the broker unblocked publishing");
                        publishing.state.send_replace(PublishState::Open);
                    }
                    Some(_) => {}
                    None => break "its events ended".to_string(),
                },
            }
        };
        publishing.state.send_replace(PublishState::Down);
        metrics().broker_reconnects.inc();
        tracing::warn!(error = %why, "publishing connection lost; opening it again (the jobs in flight keep their deliveries)");
        let mut backoff = opts.backoff_min;
        conn = loop {
            tokio::select! {
                _ = end.changed() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            match open_publishing(&opts).await {
                Ok((conn, ch)) => {
                    *publishing.channel.write().expect("channel lock") = ch;
                    publishing.state.send_replace(PublishState::Open);
                    tracing::info!("publishing connection open again");
                    break conn;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot open the publishing connection; retrying");
                    backoff = (backoff * 2).min(opts.backoff_max);
                }
            }
        };
    }
}

async fn session<H: Handler>(
    handler: &Arc<H>,
    opts: &ConsumeOptions,
    shutdown: &mut watch::Receiver<bool>,
    returns: &Arc<std::sync::Mutex<Returns>>,
) -> SessionEnd {
    let s = match open(opts).await {
        Ok(s) => s,
        Err(e) if !e.is_transient() => return SessionEnd::Fatal(e),
        Err(e) => return SessionEnd::Lost(e.to_string()),
    };
    let mut consumer = match consume(&s.channel, &opts.queue, opts).await {
        Ok(c) => c,
        Err(why) => {
            s.close("cannot consume").await;
            return SessionEnd::Lost(why);
        }
    };
    let quarantine = AmqpConfig::quarantine_queue(&opts.queue);
    let mut isolated = match &s.quarantine {
        Some(ch) => match consume(ch, &quarantine, opts).await {
            Ok(c) => Some(c),
            Err(why) => {
                s.close("cannot consume").await;
                return SessionEnd::Lost(why);
            }
        },
        None => None,
    };
    health().set_broker_connected(true);
    tracing::info!(queue = %opts.queue, prefetch = opts.prefetch, quarantine_lane = isolated.is_some(), "consuming");
    let mut tasks = JoinSet::new();
    let (stop, stopped) = watch::channel(None::<Stop>);
    let route = Route {
        queue: opts.queue.clone(),
        home: opts.queue.clone(),
        quarantine: isolated.is_some().then(|| quarantine.clone()),
        dlq: opts.dlq.clone(),
        delay: AmqpConfig::delay_queue(&opts.queue),
        retry_delay: opts.retry_delay,
        retry: opts.settle_retry,
    };
    let job = Arc::new(JobContext {
        broker: s.broker.clone(),
        route: route.clone(),
        limit: opts.amqp.delivery_limit,
        retry_rounds: opts.retry_rounds,
        max_waits: max_waits(opts),
        timeout: opts.job_timeout,
        settle_limit: settle_limit(opts),
        returns: returns.clone(),
        stopped,
    });
    // The quarantine lane: the same, but failed and given-back copies stay
    // in quarantine.
    let alone = Arc::new(JobContext {
        route: Route {
            home: quarantine.clone(),
            ..route
        },
        broker: job.broker.clone(),
        stopped: job.stopped.clone(),
        returns: job.returns.clone(),
        ..*job
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
            next = next_isolated(&mut isolated) => match next {
                Some(Ok(delivery)) => {
                    tasks.spawn(process(handler.clone(), delivery, alone.clone()));
                }
                Some(Err(e)) => break SessionEnd::Lost(e.to_string()),
                None => break SessionEnd::Lost("the broker cancelled the quarantine consumer".into()),
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
            if let (Some(ch), Some(c)) = (&s.quarantine, &isolated) {
                let _ = ch
                    .basic_cancel(c.tag(), BasicCancelOptions::default())
                    .await;
            }
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
            // more than --concurrency jobs run after the reconnect. The
            // broker counts each return; when a message comes back to this
            // worker, those returns are not held against it.
            returns.lock().expect("returns lock").abandon_running();
            let _ = stop.send(Some(Stop::Abandon));
            finish_or_abort(&mut tasks, settle_limit(opts)).await;
            s.close("connection lost").await;
            lost
        }
    }
}

/// Starts consuming `queue` on `ch` (manual acks).
async fn consume(
    ch: &Channel,
    queue: &str,
    opts: &ConsumeOptions,
) -> Result<lapin::Consumer, String> {
    ch.basic_consume(
        queue.into(),
        opts.connection_name.as_str().into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| format!("consume {queue}: {e}"))
}

/// The next delivery of the quarantine lane; never, without one.
async fn next_isolated(c: &mut Option<lapin::Consumer>) -> Option<lapin::Result<Delivery>> {
    match c {
        Some(c) => c.next().await,
        None => std::future::pending().await,
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
    let consuming = Arc::new(connect(&opts.amqp, &opts.connection_name).await?);
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
    // Jobs that were in flight when a worker died run one at a time per
    // worker, so a job that kills its worker takes no other job with it.
    // A consumer of one job at a time needs no such lane: it is alone.
    let quarantine = if opts.prefetch > 1 {
        super::declare_quarantine(&channel, &opts.amqp, &opts.queue, &opts.dlq).await?;
        let ch = consuming
            .create_channel()
            .await
            .map_err(amqp("open channel"))?;
        ch.basic_qos(1, BasicQosOptions::default())
            .await
            .map_err(amqp("set the quarantine lane's prefetch"))?;
        Some(ch)
    } else {
        None
    };
    let (conn, events) = open_publishing(opts).await?;
    let publishing = Arc::new(Publishing {
        channel: std::sync::RwLock::new(events),
        state: watch::channel(PublishState::Open).0,
    });
    let (end_publishing, end) = watch::channel(false);
    let publisher = tokio::spawn(keep_publishing(opts.clone(), conn, publishing.clone(), end));
    let broker = Broker {
        cfg: Arc::new(opts.amqp.clone()),
        publishing,
        retry: opts.settle_retry,
        leases: super::lease::Leases::new(consuming.clone()),
        queue: opts.queue.as_str().into(),
        held: Arc::default(),
    };
    Ok(Session {
        consuming,
        channel,
        quarantine,
        broker,
        publisher,
        end_publishing,
    })
}

/// What every job of a session shares.
struct JobContext {
    broker: Broker,
    route: Route,
    /// Failed deliveries after which a message is poison (0: no limit).
    limit: u32,
    retry_rounds: u32,
    /// Rounds a copy waits for another copy of its job before it gives up.
    max_waits: u32,
    timeout: Duration,
    /// Longest a stopped job takes to settle.
    settle_limit: Duration,
    /// The messages running now and those abandoned on a lost connection.
    returns: Arc<std::sync::Mutex<Returns>>,
    stopped: watch::Receiver<Option<Stop>>,
}

/// Waits (of `retry_delay` each) that outlast twice a job's deadline and
/// its settling: a copy running that long has been stopped by its own
/// deadline, so a lease still held means something is wrong.
fn max_waits(opts: &ConsumeOptions) -> u32 {
    let span = 2 * (opts.job_timeout + settle_limit(opts));
    let each = opts.retry_delay.max(Duration::from_secs(1));
    (span.as_secs_f64() / each.as_secs_f64()).ceil() as u32 + 1
}

/// Messages this worker runs now, and those it abandoned when its consuming
/// connection dropped while they ran (by message id, with how often): the
/// broker counted a return for each, which is no fault of the job.
#[derive(Debug, Default)]
struct Returns {
    running: std::collections::HashMap<String, u32>,
    abandoned: std::collections::HashMap<String, u32>,
}

impl Returns {
    fn start(&mut self, id: &str) {
        *self.running.entry(id.to_string()).or_default() += 1;
    }

    fn end(&mut self, id: &str) {
        if let Some(n) = self.running.get_mut(id) {
            *n -= 1;
            if *n == 0 {
                self.running.remove(id);
            }
        }
    }

    fn abandon_running(&mut self) {
        for (id, n) in self.running.drain() {
            *self.abandoned.entry(id).or_default() += n;
        }
    }

    /// `counts` without the returns this worker caused by losing its connection.
    fn forgive(&mut self, id: &str, counts: Deliveries) -> Deliveries {
        let Some(k) = self.abandoned.remove(id) else {
            return counts;
        };
        let forgiven = counts.forgive(k);
        if forgiven != counts {
            tracing::info!(message_id = id, returns = counts.fresh_deaths - forgiven.fresh_deaths, "not counting the returns of this job: this worker lost its broker connection while it ran");
        }
        forgiven
    }
}

/// Ends a message's entry in [`Returns::running`] when its task ends.
struct Running<'a> {
    returns: &'a std::sync::Mutex<Returns>,
    id: String,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.returns.lock().expect("returns lock").end(&self.id);
    }
}

async fn process<H: Handler>(handler: Arc<H>, delivery: Delivery, cx: Arc<JobContext>) {
    let _in_flight = InFlight::start();
    let props = &delivery.properties;
    let id = crate::queue::message_id(props);
    let deliveries = {
        let mut returns = cx.returns.lock().expect("returns lock");
        let counts = returns.forgive(&id, Deliveries::of(props.headers().as_ref()));
        returns.start(&id);
        counts
    };
    let _running = Running {
        returns: &cx.returns,
        id: id.clone(),
    };
    let msg = Incoming {
        data: delivery.data.clone(),
        message_id: props.message_id().as_ref().map(|s| s.to_string()),
        deliveries,
        queue_wait_ms: props.timestamp().map(|ts| {
            let now = chrono::Utc::now().timestamp_millis() as f64;
            (now - ts as f64 * 1e3).max(0.0)
        }),
        received: Instant::now(),
        requeued_at: requeued_at(props.headers().as_ref()),
    };
    let id = if id.is_empty() { "-".to_string() } else { id };
    if let Some(ms) = msg.queue_wait_ms {
        metrics().queue_wait_seconds.observe(ms / 1e3);
    }
    let received = msg.received;
    let counts = msg.deliveries;
    // Back from a worker that died or lost its connection, in the lane of
    // many jobs at once: it may be the culprit or an innocent bystander.
    // It goes to the quarantine lane, where it runs alone and what happens
    // to it counts.
    if counts.fresh_deaths > 0 && cx.route.quarantine.is_some() && cx.route.home == cx.route.queue {
        let settled = settle(
            &delivery,
            counts,
            Outcome::Quarantine,
            &cx.broker,
            &cx.route,
            &id,
            Cause::Rejected,
        )
        .await;
        metrics().job_settled(settled);
        return;
    }
    let poison = cx.limit > 0 && counts.failed >= cx.limit;
    let broker = cx.broker.for_delivery();
    let holder = broker.clone();
    let again = msg.clone();
    let work = async {
        if poison {
            let reason = counts.poison_reason();
            std::panic::AssertUnwindSafe(handler.clone().poison(msg, reason, broker))
                .catch_unwind()
                .await
        } else {
            std::panic::AssertUnwindSafe(handler.clone().handle(msg, broker))
                .catch_unwind()
                .await
        }
    };
    // Everything the job does, its give-up path included, ends by this
    // deadline, so a job plus its settling stays below the broker's
    // consumer_timeout.
    let mut deadline = tokio::time::Instant::now() + cx.timeout;
    let mut stopped = cx.stopped.clone();
    tokio::pin!(work);
    let timer = tokio::time::sleep_until(deadline);
    tokio::pin!(timer);
    let outcome = loop {
        tokio::select! {
            done = &mut work => break match done {
                Ok(outcome) if poison => last_word(outcome),
                Ok(outcome) => outcome,
                Err(panic) => Outcome::Failed {
                    reason: format!("job panicked: {}", panic_text(&panic)),
                },
            },
            _ = timer.as_mut() => {
                if !cx.broker.held_up() {
                    break Outcome::Failed {
                        reason: format!(
                            "job did not finish within {} s (--job-timeout-s)",
                            cx.timeout.as_secs()
                        ),
                    };
                }
                // Publishing is held up (an alarm, a reconnect): the job is
                // waiting for the broker, not failing. It goes on once
                // publishing does, with the settling time added.
                tracing::warn!("job deadline reached while the broker holds up publishing; waiting for the broker, not counting it");
                let mut stopping = cx.stopped.clone();
                tokio::select! {
                    _ = cx.broker.open() => {}
                    stop = stop_signal(&mut stopping) => break stopped_outcome(stop),
                }
                deadline = tokio::time::Instant::now() + cx.settle_limit;
                timer.as_mut().reset(deadline);
            }
            stop = stop_signal(&mut stopped) => break stopped_outcome(stop),
        }
    };
    // A job stopped at its deadline, or one that panicked, may still hold
    // its lease: free it before a copy of the message exists.
    holder.release_held().await;
    let (outcome, cause) = match outcome {
        Outcome::Retry { reason }
            if cx.retry_rounds > 0 && counts.retries + 1 >= cx.retry_rounds =>
        {
            let reason = format!(
                "gave up: transient failures outlasted the retries {} times (--retry-rounds); the last: {reason}",
                counts.retries + 1
            );
            let give_up = handler.clone().poison(again, reason.clone(), holder.clone());
            let outcome = tokio::time::timeout_at(deadline, give_up).await;
            holder.release_held().await;
            let outcome = match outcome {
                Ok(o) => last_word(o),
                Err(_) => Outcome::Rejected {
                    reason: format!("{reason} (its error result could not be written before the job's deadline)"),
                },
            };
            (outcome, Cause::GaveUp)
        }
        Outcome::Wait { reason } if counts.waits >= cx.max_waits => (
            Outcome::Rejected {
                reason: format!(
                    "gave up waiting: another copy of this job held it through {} waits of {} s ({reason}); nothing was written by this copy",
                    counts.waits,
                    cx.route.retry_delay.as_secs()
                ),
            },
            Cause::GaveUp,
        ),
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

fn requeued_at(headers: Option<&FieldTable>) -> Option<chrono::DateTime<chrono::Utc>> {
    let at = super::deadletters::header_text(headers, super::deadletters::REQUEUED_AT_HEADER);
    chrono::DateTime::parse_from_rfc3339(&at)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// Waits until running jobs are told to stop, and why.
async fn stop_signal(rx: &mut watch::Receiver<Option<Stop>>) -> Option<Stop> {
    rx.wait_for(Option::is_some).await.ok().and_then(|s| *s)
}

fn stopped_outcome(stop: Option<Stop>) -> Outcome {
    match stop {
        Some(Stop::GiveBack) => Outcome::GiveBack,
        _ => Outcome::Abandoned,
    }
}

/// The outcome of a message that is not tried again (poison, given up): it
/// ends in the dead-letter queue even when its error result cannot be
/// written (a results prefix that refuses writes, a store that stays away),
/// so no message circles through the delay queue for ever. A copy that finds
/// another copy running still waits for it.
fn last_word(o: Outcome) -> Outcome {
    match o {
        Outcome::Retry { reason } | Outcome::Failed { reason } => Outcome::Rejected {
            reason: format!("{reason} (dead-lettered without an error result)"),
        },
        o => o,
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
