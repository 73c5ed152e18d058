//! MLLP (the Minimal Lower Layer Protocol of HL7 v2 over TCP): one message
//! framed as `0x0B message 0x1C 0x0D`, answered by one framed ACK on the same
//! connection. The connection is kept open between messages and reopened
//! after any failure; messages go one at a time, as MLLP requires.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

const START: u8 = 0x0B;
const END: &[u8] = &[0x1C, 0x0D];
/// Largest ACK accepted.
const MAX_ACK_BYTES: usize = 1 << 20;

/// Why a message got no answer (always worth trying again).
#[derive(Debug, thiserror::Error)]
#[error("MLLP {addr}: {detail}")]
pub struct MllpError {
    pub addr: String,
    pub detail: String,
}

/// A client of one MLLP receiver.
#[derive(Debug)]
pub struct MllpClient {
    addr: String,
    timeout: Duration,
    conn: Mutex<Option<TcpStream>>,
}

impl MllpClient {
    /// `addr`: `host:port`; `timeout`: for connecting, and for the ACK.
    pub fn new(addr: &str, timeout: Duration) -> MllpClient {
        MllpClient {
            addr: addr.to_string(),
            timeout,
            conn: Mutex::new(None),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends one message and returns the receiver's answer (unframed).
    pub async fn send(&self, message: &str) -> Result<String, MllpError> {
        let mut conn = self.conn.lock().await;
        let result = self.exchange(&mut conn, message).await;
        if result.is_err() {
            *conn = None; // a half-read answer must not be taken for the next one's
        }
        result
    }

    async fn exchange(
        &self,
        conn: &mut Option<TcpStream>,
        message: &str,
    ) -> Result<String, MllpError> {
        let err = |detail: String| MllpError {
            addr: self.addr.clone(),
            detail,
        };
        if conn.is_none() {
            let c = tokio::time::timeout(self.timeout, TcpStream::connect(&self.addr))
                .await
                .map_err(|_| err(format!("no connection within {:?}", self.timeout)))?
                .map_err(|e| err(format!("cannot connect: {e}")))?;
            let _ = c.set_nodelay(true);
            *conn = Some(c);
        }
        let stream = conn.as_mut().expect("connected above");
        let mut frame = Vec::with_capacity(message.len() + 3);
        frame.push(START);
        frame.extend_from_slice(message.as_bytes());
        frame.extend_from_slice(END);
        stream
            .write_all(&frame)
            .await
            .map_err(|e| err(format!("cannot send: {e}")))?;
        let read = async {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            loop {
                let n = stream
                    .read(&mut chunk)
                    .await
                    .map_err(|e| format!("reading the ACK: {e}"))?;
                if n == 0 {
                    return Err("the receiver closed the connection without an ACK".to_string());
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = buf.windows(2).position(|w| w == END) {
                    let start = buf.iter().position(|&b| b == START).map_or(0, |s| s + 1);
                    return Ok(String::from_utf8_lossy(&buf[start.min(end)..end]).into_owned());
                }
                if buf.len() > MAX_ACK_BYTES {
                    return Err(format!("ACK longer than {MAX_ACK_BYTES} bytes"));
                }
            }
        };
        tokio::time::timeout(self.timeout, read)
            .await
            .map_err(|_| err(format!("no ACK within {:?}", self.timeout)))?
            .map_err(err)
    }
}
