//! Leases: "only one of us at a time", held by a broker connection.
//!
//! A lease is an exclusive, auto-deleted queue with a name of its own
//! (nothing is ever published to it). RabbitMQ lets one connection declare
//! an exclusive queue; a second connection's declare is refused with
//! `RESOURCE_LOCKED`, and the queue vanishes when its connection does. That
//! ties a lease to the life of the process holding it, which an object store
//! cannot do: a claim object cannot tell a copy that is still running from
//! one whose worker was killed, while the broker knows at once (heartbeats,
//! TCP) that the holder is gone.
//!
//! Used for:
//! - a job while it is graded (`<queue>.lease.<job_id>`): two copies of one
//!   job published twice never run at once, on any number of workers;
//! - a result while the LIS bridge delivers it, so two events for one result
//!   cannot both miss the receipt and both send;
//! - the active `cinflow watch` of a prefix (leader election).
//!
//! A connection may declare its own exclusive queue again, so two holders
//! on one connection (two copies of a job on one worker) are kept apart by
//! [`Leases`], which remembers the leases its connection holds.
//!
//! Queue names are at most 255 bytes; a longer lease name is shortened to a
//! hash of itself.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use super::{amqp, QueueError};

/// A held lease; release it with [`Lease::release`]. Dropped without a
/// release, it is released in the background (or with its connection).
#[derive(Debug)]
pub struct Lease {
    name: String,
    channel: Option<Channel>,
    /// The holding connection's set of held leases, which this one leaves.
    held: Option<Arc<Mutex<HashSet<String>>>>,
}

/// The leases of one connection: taken from the broker, and remembered so
/// that a second taker on the same connection is refused too.
#[derive(Debug, Clone)]
pub struct Leases {
    conn: Arc<Connection>,
    held: Arc<Mutex<HashSet<String>>>,
}

impl Leases {
    pub fn new(conn: Arc<Connection>) -> Leases {
        Leases {
            conn,
            held: Arc::default(),
        }
    }

    /// Tries to take the lease `name`: `None` when another connection, or
    /// another holder on this one, has it.
    pub async fn try_take(&self, name: &str) -> Result<Option<Lease>, QueueError> {
        let queue = lease_queue(name);
        if !self.held.lock().expect("leases lock").insert(queue.clone()) {
            return Ok(None);
        }
        let taken = try_take(&self.conn, name).await;
        match taken {
            Ok(Some(mut lease)) => {
                lease.held = Some(self.held.clone());
                Ok(Some(lease))
            }
            other => {
                self.held.lock().expect("leases lock").remove(&queue);
                other
            }
        }
    }
}

/// The queue name of a lease: `name` itself, or `<first 200 bytes>.<hash>`
/// when `name` is longer than a queue name may be.
pub fn lease_queue(name: &str) -> String {
    if name.len() <= 255 {
        return name.to_string();
    }
    let mut cut = 200;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    let h = crate::hashing::sha256_hex(name.as_bytes());
    format!("{}.{}", &name[..cut], &h[..32])
}

/// Whether a broker error says another connection holds an exclusive queue.
fn locked(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED)))
}

/// Tries to take the lease `name` on `conn`: `None` when another connection
/// holds it. The lease lives on a channel of its own (a refused declare
/// closes its channel, so nothing else may share it).
pub async fn try_take(conn: &Connection, name: &str) -> Result<Option<Lease>, QueueError> {
    let queue = lease_queue(name);
    let ch = conn.create_channel().await.map_err(amqp("open channel"))?;
    let opts = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    match ch
        .queue_declare(queue.as_str().into(), opts, FieldTable::default())
        .await
    {
        Ok(_) => Ok(Some(Lease {
            name: queue,
            channel: Some(ch),
            held: None,
        })),
        Err(e) if locked(&e) => Ok(None),
        Err(e) => {
            let _ = ch.close(200, "lease not taken".into()).await;
            Err(amqp(format!("take the lease {queue}"))(e))
        }
    }
}

impl Lease {
    /// The lease's queue name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Gives the lease up now (a lost connection has given it up already).
    pub async fn release(mut self) {
        if let Some(ch) = self.channel.take() {
            release(&self.name, ch).await;
        }
        self.leave();
    }

    /// Leaves the holding connection's set, after the broker's queue is gone.
    fn leave(&mut self) {
        if let Some(held) = self.held.take() {
            held.lock().expect("leases lock").remove(&self.name);
        }
    }
}

async fn release(name: &str, ch: Channel) {
    if let Err(e) = ch
        .queue_delete(name.into(), QueueDeleteOptions::default())
        .await
    {
        tracing::debug!(lease = name, error = %e, "could not delete the lease queue (its connection is gone?)");
    }
    let _ = ch.close(200, "lease released".into()).await;
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(ch) = self.channel.take() {
            let name = self.name.clone();
            let held = self.held.take();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    release(&name, ch).await;
                    if let Some(held) = held {
                        held.lock().expect("leases lock").remove(&name);
                    }
                });
                return;
            }
        }
        self.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_hashed_to_a_valid_queue_name() {
        assert_eq!(
            lease_queue("cinflow.infer.lease.j1"),
            "cinflow.infer.lease.j1"
        );
        let long = format!("cinflow.infer.lease.{}", "é".repeat(200));
        let q = lease_queue(&long);
        assert!(q.len() <= 255, "{}", q.len());
        assert_ne!(lease_queue(&format!("{long}x")), q);
    }
}
