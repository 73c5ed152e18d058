//! `cinflow queues migrate`: recreates work queues that an earlier release
//! declared with other arguments (RabbitMQ cannot change a queue's
//! arguments), keeping their messages.
//!
//! For each work queue whose declaration is refused as inequivalent: its
//! messages are moved, each confirmed before it is acked, to the quorum queue
//! `<queue>.migrating`; the old queue is deleted; the topology is declared
//! (the queue comes back with the current arguments); the messages are moved
//! back through the jobs exchange. Message ids and headers are kept. Run it
//! with the workers stopped: a worker would otherwise consume from the queue
//! while it is moved. Running it again changes nothing.

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
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
        let moved = transfer(&ch, cfg, queue, "", &aside).await?;
        ch.queue_delete(queue.as_str().into(), Default::default())
            .await
            .map_err(amqp(format!("delete queue {queue}")))?;
        declare_topology(&ch, cfg).await.or_else(|e| match e {
            // The other work queue is still old: declared when its turn comes.
            QueueError::Inequivalent { queue: q, .. } if &q != queue => Ok(()),
            e => Err(e),
        })?;
        let ch = confirm_channel(conn).await?;
        let back = transfer(&ch, cfg, &aside, &cfg.jobs_exchange, key).await?;
        ch.queue_delete(aside.as_str().into(), Default::default())
            .await
            .map_err(amqp(format!("delete queue {aside}")))?;
        tracing::info!(queue = %queue, moved, back, "queue recreated with the current arguments");
        out.push(Migrated {
            queue: queue.clone(),
            messages: Some(back),
        });
    }
    Ok(out)
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
