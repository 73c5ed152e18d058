//! `cinflow queues migrate`: recreates work queues that an earlier release
//! declared with other arguments (RabbitMQ cannot change a queue's
//! arguments), keeping their messages.
//!
//! For each work queue whose declaration is refused as inequivalent: its
//! messages are moved, each confirmed before it is acked, to the quorum queue
//! `<queue>.migrating`; the old queue is deleted; the topology is declared
//! (the queue comes back with the current arguments); the messages are moved
//! back through the jobs exchange. Message ids and headers are kept. A queue
//! is deleted only when it is empty (`if-empty`): a publisher still sending
//! while it is moved gets its messages moved too, never deleted. Run it with
//! the workers stopped: a worker would otherwise consume from the queue
//! while it is moved. Running it again changes nothing.

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
        let moved = drain_and_delete(conn, cfg, queue, "", &aside).await?;
        declare_topology(&ch, cfg).await.or_else(|e| match e {
            // The other work queue is still old: declared when its turn comes.
            QueueError::Inequivalent { queue: q, .. } if &q != queue => Ok(()),
            e => Err(e),
        })?;
        let back = drain_and_delete(conn, cfg, &aside, &cfg.jobs_exchange, key).await?;
        tracing::info!(queue = %queue, moved, back, "queue recreated with the current arguments");
        out.push(Migrated {
            queue: queue.clone(),
            messages: Some(back),
        });
    }
    Ok(out)
}

/// Moves every message of `from` to `exchange`/`key` and deletes `from`,
/// but only once it is empty: a publisher still sending to it between the
/// last move and the delete makes the broker refuse the delete
/// (`if-empty`), and the new messages are moved too. Returns how many moved.
async fn drain_and_delete(
    conn: &Connection,
    cfg: &AmqpConfig,
    from: &str,
    exchange: &str,
    key: &str,
) -> Result<usize, QueueError> {
    let mut moved = 0;
    for _ in 0..MAX_DELETE_TRIES {
        // A refused delete closes its channel: a new one each round.
        let ch = confirm_channel(conn).await?;
        moved += transfer(&ch, cfg, from, exchange, key).await?;
        let only_if_empty = QueueDeleteOptions {
            if_empty: true,
            ..Default::default()
        };
        match ch.queue_delete(from.into(), only_if_empty).await {
            Ok(_) => return Ok(moved),
            Err(e) if refused_as_not_empty(&e) => {
                tracing::info!(
                    queue = from,
                    "messages arrived while moving; moving them too"
                );
            }
            Err(e) => return Err(amqp(format!("delete queue {from}"))(e)),
        }
    }
    Err(QueueError::Config {
        url: crate::queue::redact_url(&cfg.url),
        detail: format!("queue {from} kept receiving messages through {MAX_DELETE_TRIES} moves; stop its publishers and run the migration again (nothing was lost: the messages moved so far are in the new queue)"),
    })
}

/// Rounds of moving and deleting before the migration stops.
const MAX_DELETE_TRIES: usize = 20;

/// Whether the broker refused a delete because the queue is not empty
/// (PRECONDITION_FAILED).
fn refused_as_not_empty(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)))
}

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
