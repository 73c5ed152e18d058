//! The accept loop of every server a cinflow process runs: the metrics and
//! probes endpoint ([`crate::observe::http`]) and the LIS bridge's sign-out
//! listeners over MLLP and FHIR ([`crate::lis::signout`]).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// How long the loop waits after a failed accept (out of file descriptors and
/// the like) before the next, so that it does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Binds `addr` (`flag` names the setting in the error) and hands every
/// accepted connection to `handle` on its own task, until the process ends.
/// Returns the bound address (port 0 picks a free one).
pub async fn serve<H, F>(
    addr: &str,
    flag: &str,
    server: &'static str,
    handle: H,
) -> anyhow::Result<SocketAddr>
where
    H: Fn(TcpStream, SocketAddr) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({flag}): {e}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    tokio::spawn(handle(stream, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, server, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    });
    Ok(local)
}
