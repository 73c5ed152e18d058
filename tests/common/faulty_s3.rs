//! A fault-injecting HTTP/1.1 reverse proxy in front of the S3 server, for tests.
//!
//! Every request is forwarded to the upstream server byte for byte (headers
//! included), so SigV4 signatures stay valid: the client signs for the Host it
//! connects to, the proxy, and the server checks the signature against the Host
//! header as received, which is still the proxy's. The proxy counts requests by
//! method and path and answers chosen ones itself with an S3 error (not
//! forwarded), so a test can make one GET or PUT fail transiently and count how
//! often each object was fetched or written.
//!
//! It runs on a thread of its own with its own tokio runtime (the tests are
//! synchronous) and stops when dropped.
//!
//! ```ignore
//! let proxy = FaultyS3::start(&common::s3_config().endpoint.unwrap());
//! let store = S3Store::new(&S3Config { endpoint: Some(proxy.endpoint()), ..common::s3_config() })?;
//! proxy.fail("GET", "/img1.jpg", 1, 503);
//! store.get(&format!("{prefix}/img1.jpg"))?; // retried by the store
//! assert_eq!(proxy.count("GET", "/img1.jpg"), 2);
//! ```

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// The longest request or response head accepted.
const MAX_HEAD: usize = 1 << 20;
/// How long one forwarded exchange may take before the client gets a 504.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(120);

/// A running proxy: listens on a free loopback port; stops when dropped.
pub struct FaultyS3 {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct State {
    faults: Vec<Fault>,
    seen: Vec<Seen>,
}

struct Fault {
    method: String,
    path_contains: String,
    left: usize,
    action: Action,
}

#[derive(Clone, Copy)]
enum Action {
    /// Answer with this error status, not forwarded.
    Fail(u16),
    /// Hold the request this long, then forward it.
    Delay(Duration),
}

struct Seen {
    method: String,
    /// The request target as sent: path and query, percent-encoded.
    target: String,
    /// The path without the query, percent-decoded (what the matchers look at).
    path: String,
    /// 0 until the answer is known.
    status: u16,
}

fn matches(method: &str, path: &str, want_method: &str, path_contains: &str) -> bool {
    method.eq_ignore_ascii_case(want_method) && path.contains(path_contains)
}

impl FaultyS3 {
    /// Starts a proxy to `upstream` (`http://host:port`, e.g. `$CINFLOW_S3_ENDPOINT`)
    /// on 127.0.0.1 with a free port.
    pub fn start(upstream: &str) -> FaultyS3 {
        let authority = upstream
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("{upstream}: the proxy speaks plain http:// only"));
        let authority = authority.split('/').next().unwrap();
        let target = authority
            .to_socket_addrs()
            .unwrap_or_else(|e| panic!("{upstream}: {e}"))
            .next()
            .unwrap_or_else(|| panic!("{upstream}: no address"));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name("faulty-s3".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    tokio::pin!(stopped);
                    loop {
                        tokio::select! {
                            _ = &mut stopped => break,
                            accepted = listener.accept() => {
                                if let Ok((client, _)) = accepted {
                                    tokio::spawn(serve(client, target, shared.clone()));
                                }
                            }
                        }
                    }
                });
                // Dropping the runtime ends the connections still open.
            })
            .unwrap();
        FaultyS3 {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The URL to give the S3 client (`--s3-endpoint`): `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers the next `times` requests whose method is `method` and whose path
    /// (percent-decoded, without the query) contains `path_contains` with
    /// `status` and an S3 XML error (`ServiceUnavailable` for 503,
    /// `InternalError` for 500, `SlowDown` for 429), without forwarding them.
    /// Faults added earlier are used first.
    pub fn fail(&self, method: &str, path_contains: &str, times: usize, status: u16) {
        assert!((400..600).contains(&status), "{status} is not an error");
        self.state.lock().unwrap().faults.push(Fault {
            method: method.to_string(),
            path_contains: path_contains.to_string(),
            left: times,
            action: Action::Fail(status),
        });
    }

    /// Holds the next `times` matching requests for `by` before forwarding
    /// them (a slow or wedged server).
    pub fn delay(&self, method: &str, path_contains: &str, times: usize, by: Duration) {
        self.state.lock().unwrap().faults.push(Fault {
            method: method.to_string(),
            path_contains: path_contains.to_string(),
            left: times,
            action: Action::Delay(by),
        });
    }

    /// How many requests (forwarded or failed) had this method and a path
    /// (percent-decoded, without the query) containing `path_contains`.
    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        let state = self.state.lock().unwrap();
        state
            .seen
            .iter()
            .filter(|s| matches(&s.method, &s.path, method, path_contains))
            .count()
    }

    /// Every request so far, in order: method, target (path and query, as sent)
    /// and the status answered (0 while in flight).
    pub fn requests(&self) -> Vec<(String, String, u16)> {
        let state = self.state.lock().unwrap();
        state
            .seen
            .iter()
            .map(|s| (s.method.clone(), s.target.clone(), s.status))
            .collect()
    }
}

impl Drop for FaultyS3 {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One request, read whole.
struct Request {
    method: String,
    target: String,
    /// Head and body exactly as received.
    raw: Vec<u8>,
    /// The client asked to close the connection after this exchange.
    close: bool,
}

/// One final (non-1xx) response, read whole.
struct Response {
    status: u16,
    /// Head and body exactly as received.
    raw: Vec<u8>,
    /// The connection cannot carry another exchange after this one.
    close: bool,
}

/// How a message body is delimited.
enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

/// Serves one client connection: its requests in order, forwarded over one
/// upstream connection of its own (opened again when the server closes it).
async fn serve(client: TcpStream, target: SocketAddr, state: Arc<Mutex<State>>) {
    let _ = client.set_nodelay(true);
    let (rd, mut wr) = client.into_split();
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let mut upstream: Option<Upstream> = None;
    while let Ok(Some(req)) = read_request(&mut rd, &mut wr).await {
        let path = percent_decoded(req.target.split('?').next().unwrap_or(""));
        let (index, fault) = {
            let mut st = state.lock().unwrap();
            let fault = st
                .faults
                .iter_mut()
                .find(|f| f.left > 0 && matches(&req.method, &path, &f.method, &f.path_contains))
                .map(|f| {
                    f.left -= 1;
                    f.action
                });
            st.seen.push(Seen {
                method: req.method.clone(),
                target: req.target.clone(),
                path: path.clone(),
                status: 0,
            });
            (st.seen.len() - 1, fault)
        };
        let answer = match fault {
            Some(Action::Fail(status)) => Response {
                status,
                raw: s3_error(status, &req.method, &path, index),
                close: false,
            },
            delayed => {
                if let Some(Action::Delay(by)) = delayed {
                    tokio::time::sleep(by).await;
                }
                match tokio::time::timeout(UPSTREAM_TIMEOUT, forward(&mut upstream, target, &req))
                    .await
                {
                    Ok(Ok(resp)) => resp,
                    Ok(Err(_)) => Response {
                        status: 502,
                        raw: s3_error(502, &req.method, &path, index),
                        close: true,
                    },
                    Err(_) => {
                        upstream = None;
                        Response {
                            status: 504,
                            raw: s3_error(504, &req.method, &path, index),
                            close: true,
                        }
                    }
                }
            }
        };
        state.lock().unwrap().seen[index].status = answer.status;
        if wr.write_all(&answer.raw).await.is_err() {
            return;
        }
        if answer.close || req.close {
            let _ = wr.shutdown().await;
            return;
        }
    }
}

/// A connection to the upstream server.
struct Upstream {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    /// Whether an exchange went over it already (a kept-alive connection the
    /// server may have closed meanwhile).
    used: bool,
}

async fn connect(target: SocketAddr) -> io::Result<Upstream> {
    let s = TcpStream::connect(target).await?;
    let _ = s.set_nodelay(true);
    let (rd, wr) = s.into_split();
    Ok(Upstream {
        rd: BufReader::with_capacity(64 * 1024, rd),
        wr,
        used: false,
    })
}

/// Sends `req` upstream and reads the answer; once more on a fresh connection
/// when a reused one turns out to be closed before any answer.
async fn forward(
    upstream: &mut Option<Upstream>,
    target: SocketAddr,
    req: &Request,
) -> io::Result<Response> {
    for _ in 0..2 {
        let conn = match upstream {
            Some(c) => c,
            None => upstream.insert(connect(target).await?),
        };
        let reused = conn.used;
        conn.used = true;
        match exchange(conn, req).await {
            Ok(Some((resp, in_sync))) => {
                if resp.close || !in_sync {
                    *upstream = None;
                }
                return Ok(resp);
            }
            Ok(None) if reused => *upstream = None,
            Ok(None) => {
                *upstream = None;
                break;
            }
            Err(e) => {
                *upstream = None;
                return Err(e);
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the server closed the connection without answering",
    ))
}

/// Writes the request while reading the response (the server may answer, say a
/// 403, before it has read a large body). `None`: the connection was closed
/// before any byte of an answer. The flag says whether the whole request went
/// out, i.e. whether the connection can carry another exchange.
async fn exchange(conn: &mut Upstream, req: &Request) -> io::Result<Option<(Response, bool)>> {
    let head_only = req.method.eq_ignore_ascii_case("HEAD");
    let write = conn.wr.write_all(&req.raw);
    let read = read_response(&mut conn.rd, head_only);
    tokio::pin!(write, read);
    let mut wrote: Option<bool> = None;
    loop {
        tokio::select! {
            biased;
            w = &mut write, if wrote.is_none() => wrote = Some(w.is_ok()),
            r = &mut read => return Ok(r?.map(|resp| (resp, wrote == Some(true)))),
        }
    }
}

async fn read_request(
    rd: &mut BufReader<OwnedReadHalf>,
    wr: &mut OwnedWriteHalf,
) -> io::Result<Option<Request>> {
    let Some(mut raw) = read_head(rd).await? else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&raw).into_owned();
    let mut line = head.lines().next().unwrap_or("").split(' ');
    let (Some(method), Some(target), Some(version)) = (line.next(), line.next(), line.next())
    else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad request line",
        ));
    };
    let connection = header(&head, "connection")
        .unwrap_or("")
        .to_ascii_lowercase();
    let close = connection.contains("close")
        || (version == "HTTP/1.0" && !connection.contains("keep-alive"));
    if header(&head, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        // Answered here; the server's own 100 is dropped (see read_response).
        wr.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
    }
    let framing = if is_chunked(&head) {
        Framing::Chunked
    } else {
        match content_length(&head)? {
            Some(n) => Framing::Length(n),
            None => Framing::Empty,
        }
    };
    read_body(rd, framing, &mut raw).await?;
    Ok(Some(Request {
        method: method.to_string(),
        target: target.to_string(),
        raw,
        close,
    }))
}

async fn read_response<R: AsyncBufRead + Unpin>(
    rd: &mut R,
    head_only: bool,
) -> io::Result<Option<Response>> {
    let mut first = true;
    loop {
        let raw = match read_head(rd).await {
            Ok(Some(raw)) => raw,
            Ok(None) if first => return Ok(None),
            Err(e)
                if first
                    && matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::BrokenPipe
                    ) =>
            {
                return Ok(None)
            }
            Ok(None) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed after an interim response",
                ))
            }
            Err(e) => return Err(e),
        };
        first = false;
        let head = String::from_utf8_lossy(&raw).into_owned();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad status line"))?;
        if (100..200).contains(&status) && status != 101 {
            // Interim (100 Continue to our Expect): the client had its own already.
            continue;
        }
        let framing = if head_only || status == 204 || status == 304 || status == 101 {
            Framing::Empty
        } else if is_chunked(&head) {
            Framing::Chunked
        } else {
            match content_length(&head)? {
                Some(n) => Framing::Length(n),
                None => Framing::UntilClose,
            }
        };
        let close = matches!(framing, Framing::UntilClose)
            || header(&head, "connection")
                .is_some_and(|v| v.to_ascii_lowercase().contains("close"))
            || head.starts_with("HTTP/1.0");
        let mut raw = raw;
        read_body(rd, framing, &mut raw).await?;
        return Ok(Some(Response { status, raw, close }));
    }
}

/// Reads a message head up to and including the empty line; `None` on a clean
/// end of stream before it.
async fn read_head<R: AsyncBufRead + Unpin>(rd: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let start = head.len();
        if rd.read_until(b'\n', &mut head).await? == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        if matches!(&head[start..], b"\r\n" | b"\n") {
            if start == 0 {
                // A stray empty line between messages.
                head.clear();
                continue;
            }
            return Ok(Some(head));
        }
        if head.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too long"));
        }
    }
}

/// Appends the body, framing included (chunk sizes, trailers), to `out`.
async fn read_body<R: AsyncBufRead + Unpin>(
    rd: &mut R,
    framing: Framing,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    match framing {
        Framing::Empty => Ok(()),
        Framing::Length(n) => read_exact_into(rd, n, out).await,
        Framing::UntilClose => rd.read_to_end(out).await.map(|_| ()),
        Framing::Chunked => loop {
            let start = out.len();
            read_line(rd, out).await?;
            let line = String::from_utf8_lossy(&out[start..]);
            let size = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, format!("chunk size {size:?}"))
            })?;
            if size == 0 {
                // Trailer fields, then the empty line.
                loop {
                    let start = out.len();
                    read_line(rd, out).await?;
                    if matches!(&out[start..], b"\r\n" | b"\n") {
                        return Ok(());
                    }
                }
            }
            read_exact_into(rd, size, out).await?;
            read_line(rd, out).await?;
        },
    }
}

async fn read_line<R: AsyncBufRead + Unpin>(rd: &mut R, out: &mut Vec<u8>) -> io::Result<()> {
    if rd.read_until(b'\n', out).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

async fn read_exact_into<R: AsyncBufRead + Unpin>(
    rd: &mut R,
    n: usize,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let start = out.len();
    out.resize(start + n, 0);
    rd.read_exact(&mut out[start..]).await.map(|_| ())
}

/// The value of a header field (the first one of that name).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

fn is_chunked(head: &str) -> bool {
    header(head, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
}

fn content_length(head: &str) -> io::Result<Option<usize>> {
    header(head, "content-length")
        .map(|v| {
            v.parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad content-length"))
        })
        .transpose()
}

fn percent_decoded(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 3 <= b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A complete S3 error response (no body for HEAD, as S3 does).
fn s3_error(status: u16, method: &str, resource: &str, id: usize) -> Vec<u8> {
    let (code, reason) = match status {
        400 => ("InvalidRequest", "Bad Request"),
        403 => ("AccessDenied", "Forbidden"),
        404 => ("NoSuchKey", "Not Found"),
        408 => ("RequestTimeout", "Request Timeout"),
        429 => ("SlowDown", "Too Many Requests"),
        500 => ("InternalError", "Internal Server Error"),
        502 => ("InternalError", "Bad Gateway"),
        503 => ("ServiceUnavailable", "Service Unavailable"),
        504 => ("InternalError", "Gateway Timeout"),
        s if s >= 500 => ("InternalError", "Server Error"),
        _ => ("InvalidRequest", "Client Error"),
    };
    let request_id = format!("faulty-s3-{id}");
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{reason} (injected by the test proxy)</Message><Resource>{}</Resource><RequestId>{request_id}</RequestId></Error>",
        resource.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
    );
    let head_only = method.eq_ignore_ascii_case("HEAD");
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nx-amz-request-id: {request_id}\r\n\r\n",
        if head_only { 0 } else { body.len() }
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}
