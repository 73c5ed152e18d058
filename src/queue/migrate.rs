//! `cinflow queues migrate`: recreates work queues that an earlier release
//! declared with other arguments (RabbitMQ cannot change a queue's
//! arguments), keeping their messages, while publishers go on sending.
//!
//! For each work queue whose declaration is refused as inequivalent:
//! 1. the quorum queue `<queue>.migrating` is declared and bound to the jobs
//!    exchange with the queue's routing key, then the old queue is unbound:
//!    from that moment what publishers send through the exchange (as
//!    `cinflow enqueue` and `cinflow watch` do) lands in the holding queue,
//!    and there is no moment when no queue takes it;
//! 2. the old queue's messages are moved to the holding queue, each confirmed
//!    before it is acked, until the broker reports it empty, and only then is
//!    it deleted (quorum queues refuse `queue.delete` with `if-empty`, so the
//!    check is a count taken after the queue stopped receiving);
//! 3. the topology is declared (the queue comes back with the current
//!    arguments and its binding), the holding queue is unbound, and its
//!    messages are moved back through the jobs exchange.
//!
//! Message ids and headers are kept. A message published while both queues
//! are bound (an instant, twice) arrives twice; the workers grade a job once
//! however many copies arrive. Run it with the workers stopped: a worker
//! would otherwise consume from the queue while it is moved. Running it
//! again changes nothing.

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::{Channel, Connection};

use super::{
    amqp, confirm_channel, declare_topology, publish, AmqpConfig, Publish, QueueError, INFER_KEY,
    TRAIN_KEY,
};

/// What happened to one work queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Migrated {
    pub queue: String,
    /// Messages moved out and back; `None`: the queue was already current.
    pub messages: Option<usize>,
}

/// Migrates both work queues on `conn`.
pub async fn migrate(conn: &Connection, cfg: &AmqpConfig) -> Result<Vec<Migrated>, QueueError> {
    let mut out = Vec::new();
    for (queue, key) in [(&cfg.infer_queue, INFER_KEY), (&cfg.train_queue, TRAIN_KEY)] {
        // A refused declaration closes its channel: probe on a channel of its own.
        let probe = confirm_channel(conn).await?;
        let current = match declare_topology(&probe, cfg).await {
            Ok(()) => true,
            Err(QueueError::Inequivalent { queue: q, .. }) if &q == queue => false,
            Err(QueueError::Inequivalent { .. }) => true, // the other queue; its turn comes
            Err(e) => return Err(e),
        };
        if current {
            out.push(Migrated {
                queue: queue.clone(),
                messages: None,
            });
            continue;
        }
        let ch = confirm_channel(conn).await?;
        let aside = format!("{queue}.migrating");
        ch.queue_declare(
            aside.as_str().into(),
            QueueDeclareOptions::durable(),
            super::plain_quorum_args(),
        )
        .await
        .map_err(amqp(format!("declare queue {aside}")))?;
        // Publishers' messages go to the holding queue before the old one
        // stops receiving them.
        bind(&ch, &aside, &cfg.jobs_exchange, key, true).await?;
        bind(&ch, queue, &cfg.jobs_exchange, key, false).await?;
        let moved = drain_and_delete(conn, cfg, queue, "", &aside).await?;
        declare_topology(&ch, cfg).await.or_else(|e| match e {
            // The other work queue is still old: declared when its turn comes.
            QueueError::Inequivalent { queue: q, .. } if &q != queue => Ok(()),
            e => Err(e),
        })?;
        let ch = confirm_channel(conn).await?;
        bind(&ch, &aside, &cfg.jobs_exchange, key, false).await?;
        let back = drain_and_delete(conn, cfg, &aside, &cfg.jobs_exchange, key).await?;
        tracing::info!(queue = %queue, moved, back, "queue recreated with the current arguments");
        out.push(Migrated {
            queue: queue.clone(),
            messages: Some(back),
        });
    }
    Ok(out)
}

/// Binds (or unbinds) `queue` to `exchange` with `key`.
async fn bind(
    ch: &Channel,
    queue: &str,
    exchange: &str,
    key: &str,
    on: bool,
) -> Result<(), QueueError> {
    let (q, x) = (queue.into(), exchange.into());
    let args = lapin::types::FieldTable::default();
    if on {
        ch.queue_bind(q, x, key.into(), Default::default(), args)
            .await
            .map_err(amqp(format!("bind {queue} to {exchange}")))
    } else {
        ch.queue_unbind(q, x, key.into(), args)
            .await
            .map_err(amqp(format!("unbind {queue} from {exchange}")))
    }
}

/// Moves every message of `from` (no longer bound to any exchange) to
/// `exchange`/`key` until the broker counts it empty, then deletes it.
/// Returns how many moved.
async fn drain_and_delete(
    conn: &Connection,
    cfg: &AmqpConfig,
    from: &str,
    exchange: &str,
    key: &str,
) -> Result<usize, QueueError> {
    let ch = confirm_channel(conn).await?;
    let mut moved = 0;
    for _ in 0..MAX_DRAINS {
        moved += transfer(&ch, cfg, from, exchange, key).await?;
        let left = ch
            .queue_declare(
                from.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .map_err(amqp(format!("count the messages of {from}")))?
            .message_count();
        if left == 0 {
            let gone = ch
                .queue_delete(from.into(), QueueDeleteOptions::default())
                .await
                .map_err(amqp(format!("delete queue {from}")))?;
            if gone > 0 {
                // Only a publisher that sends to the queue by name, past
                // the exchange, could do this in the instant between the
                // count and the delete.
                tracing::error!(queue = from, messages = gone, "messages sent to the queue by name arrived between its last count and its delete; they are gone");
            }
            return Ok(moved);
        }
        tracing::info!(
            queue = from,
            left,
            "messages arrived while moving; moving them too"
        );
    }
    Err(QueueError::Config {
        url: crate::queue::redact_url(&cfg.url),
        detail: format!("queue {from} kept receiving messages by name through {MAX_DRAINS} moves; stop what publishes to it by name and run the migration again (nothing was lost: the messages moved so far are safe)"),
    })
}

/// Rounds of moving before the migration stops.
const MAX_DRAINS: usize = 20;

/// Moves every message of `from` to `exchange`/`key`, each confirmed before
/// it is acked; returns how many.
async fn transfer(
    ch: &Channel,
    cfg: &AmqpConfig,
    from: &str,
    exchange: &str,
    key: &str,
) -> Result<usize, QueueError> {
    let mut n = 0;
    while let Some(m) = ch
        .basic_get(from.into(), BasicGetOptions { no_ack: false })
        .await
        .map_err(amqp(format!("get from {from}")))?
    {
        let d = &m.delivery;
        let id = super::message_id(&d.properties);
        let headers = super::republished_headers(d.properties.headers().as_ref(), true);
        let p = Publish {
            exchange,
            routing_key: key,
            message_id: &id,
            payload: &d.data,
            mandatory: true,
            expiration_ms: None,
        };
        publish(ch, cfg, p, Some(headers)).await?;
        d.acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(amqp(format!("ack a message of {from}")))?;
        n += 1;
    }
    Ok(n)
}
