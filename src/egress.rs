//! `[egress]`: bearerd's own calls (token endpoints, upstreams, the trace exporter) and the
//! `passthrough` tunnels of an intercepting listener, through an HTTP proxy.
//!
//! [`Dialer`] is the TCP layer under hyper-rustls's connector. Without `[egress]` it is
//! hyper-util's `HttpConnector` and nothing else: the choice is made when the connector is
//! built, so the proxy-less path pays nothing. With it, each new connection asks
//! hyper-util's `NO_PROXY` matcher whether its host goes through the proxy; if so, bearerd
//! opens a tunnel with `CONNECT host:port` and hands the tunnel up as if it were the TCP
//! connection, so TLS (verified against the real host, SNI and all), HTTP/2 by ALPN and h2c
//! run end to end through it exactly as they do directly. `http://` targets are tunnelled
//! the same way rather than sent in absolute form, so that requests, pools and h2c need no
//! proxy-specific path; the proxy must allow `CONNECT` to their ports.
//!
//! The `CONNECT` is bearerd's own, not hyper-util's tunnel: that one reports a 407 apart and
//! every other refusal alike, and an operator needs to tell "the proxy wants credentials"
//! (407) from "the proxy forbids this host" (403) from "the proxy cannot reach it" (502).
//! The whole exchange, from TCP connect to the proxy's answer, is bounded by the connect
//! timeout, so a proxy that accepts and never answers fails like an unreachable host.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use http::{StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::{Intercept, Matcher};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_service::Service;
use zeroize::Zeroizing;

use crate::config::{self, EgressProxy};
use crate::files::{self, Content, FileError};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The longest answer to a `CONNECT` read: a status line and a few headers.
const MAX_ANSWER_BYTES: usize = 16 * 1024;

/// `[egress]` made ready: which hosts go through which proxy, with what credentials.
pub(crate) struct Egress {
    /// Decides per target, with `no_proxy`.
    matcher: Matcher,
    /// The same proxies without `no_proxy`: `--check` tells a host `no_proxy` exempts from
    /// one no proxy is set for.
    unfiltered: Matcher,
    /// `user:password`, read again for every tunnel.
    authorization_file: Option<PathBuf>,
}

/// Where a target's connections go, as `--check` says it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Way {
    /// Through the proxy at this authority.
    Proxy(String),
    /// Directly: `no_proxy` names the host.
    NoProxy,
    /// Directly: no proxy is set for its scheme.
    Direct,
}

impl Egress {
    /// The matcher of `settings`.
    pub(crate) fn new(settings: &config::Egress) -> Self {
        let (https, http, all, no) = match &settings.proxy {
            EgressProxy::Fixed(uri) => {
                let uri = uri.to_string();
                (uri.clone(), uri, String::new(), String::new())
            }
            EgressProxy::Environment(env) => (
                env.https.clone(),
                env.http.clone(),
                env.all.clone(),
                env.no.clone(),
            ),
        };
        let no = std::iter::once(no.as_str())
            .chain(settings.no_proxy.iter().map(String::as_str))
            .filter(|entry| !entry.is_empty())
            .collect::<Vec<_>>()
            .join(",");
        let build = |no: &str| {
            Matcher::builder()
                .https(https.as_str())
                .http(http.as_str())
                .all(all.as_str())
                .no(no)
                .build()
        };
        Self {
            matcher: build(&no),
            unfiltered: build(""),
            authorization_file: settings.authorization_file.clone(),
        }
    }

    /// Where connections to `target` go.
    pub(crate) fn way(&self, target: &Uri) -> Way {
        match self.matcher.intercept(target) {
            Some(intercept) => Way::Proxy(proxy_authority(intercept.uri())),
            None if self.unfiltered.intercept(target).is_some() => Way::NoProxy,
            None => Way::Direct,
        }
    }
}

/// Reads `proxy_authorization_file` as a tunnel would, for start and `--check`: the problem,
/// if it cannot be used (never its contents).
pub(crate) fn check_authorization(settings: &config::Egress) -> Result<(), TunnelError> {
    let Some(path) = &settings.authorization_file else {
        return Ok(());
    };
    let contents = files::read_sync(path, Content::Secret)?;
    user_password(&contents, path).map(drop)
}

/// The `user:password` line of the file at `path`.
fn user_password<'a>(contents: &'a [u8], path: &std::path::Path) -> Result<&'a str, TunnelError> {
    let text = files::text(contents, path, Content::Secret)?;
    let pair = text.trim_end_matches(['\r', '\n']);
    if pair.contains(':') && !pair.contains(['\r', '\n']) {
        Ok(pair)
    } else {
        Err(TunnelError::NotUserPassword(path.to_owned()))
    }
}

/// The TCP layer of every outbound connector: direct, or through `[egress]`.
#[derive(Clone)]
pub(crate) enum Dialer {
    /// No `[egress]`: hyper-util's connector alone.
    Direct(HttpConnector),
    /// Through the proxy, for the hosts it covers.
    Proxied {
        /// Dials the proxy, or a host `no_proxy` names.
        tcp: HttpConnector,
        /// The proxy settings.
        egress: Arc<Egress>,
        /// Bounds the TCP connect and the proxy's answer together.
        timeout: Duration,
    },
}

impl Dialer {
    /// `tcp` alone without `egress`, or through it.
    pub(crate) fn new(tcp: HttpConnector, egress: Option<&Arc<Egress>>, timeout: Duration) -> Self {
        match egress {
            None => Self::Direct(tcp),
            Some(egress) => Self::Proxied {
                tcp,
                egress: Arc::clone(egress),
                timeout,
            },
        }
    }
}

impl Service<Uri> for Dialer {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // HttpConnector is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, target: Uri) -> Self::Future {
        match self {
            Self::Direct(tcp) => direct(tcp, target),
            Self::Proxied {
                tcp,
                egress,
                timeout,
            } => match egress.matcher.intercept(&target) {
                Some(intercept) => Box::pin(tunnel(
                    tcp.clone(),
                    intercept,
                    target,
                    Arc::clone(egress),
                    *timeout,
                )),
                None => direct(tcp, target),
            },
        }
    }
}

/// A connection straight to `target`.
fn direct(
    tcp: &mut HttpConnector,
    target: Uri,
) -> Pin<Box<dyn Future<Output = Result<TokioIo<TcpStream>, BoxError>> + Send>> {
    let connecting = tcp.call(target);
    Box::pin(async move { connecting.await.map_err(Into::into) })
}

/// Why a tunnel through the proxy could not be opened. Every message names the proxy and the
/// target; none holds the credentials or anything the proxy sent but its status code.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TunnelError {
    /// TCP to the proxy.
    #[error("cannot connect to the proxy {proxy} (for {target})")]
    Dial {
        /// The proxy's authority.
        proxy: String,
        /// `host:port` of the tunnel asked for.
        target: String,
        /// hyper-util's error.
        #[source]
        source: BoxError,
    },
    /// The proxy wants (other) credentials: 407, or 401 as some (tinyproxy) answer wrong
    /// ones.
    #[error("the proxy {proxy} answered CONNECT {target} with {status}: {hint}")]
    AuthenticationRequired {
        /// The proxy's authority.
        proxy: String,
        /// `host:port`.
        target: String,
        /// 407 or 401.
        status: StatusCode,
        /// What to look at.
        hint: &'static str,
    },
    /// The proxy refused, or could not reach the target.
    #[error("the proxy {proxy} answered CONNECT {target} with {status}{hint}")]
    Refused {
        /// The proxy's authority.
        proxy: String,
        /// `host:port`.
        target: String,
        /// Its status.
        status: StatusCode,
        /// What the status usually means.
        hint: &'static str,
    },
    /// The proxy broke the exchange or did not speak HTTP.
    #[error("the proxy {proxy} gave no usable answer to CONNECT {target}: {reason}")]
    Protocol {
        /// The proxy's authority.
        proxy: String,
        /// `host:port`.
        target: String,
        /// What was wrong.
        reason: String,
    },
    /// No answer within the connect timeout.
    #[error("the proxy {proxy} did not open a tunnel to {target} within {}", humantime::format_duration(*.after))]
    Timeout {
        /// The proxy's authority.
        proxy: String,
        /// `host:port`.
        target: String,
        /// The connect timeout.
        after: Duration,
    },
    /// `proxy_authorization_file` could not be read or used.
    #[error("proxy_authorization_file: {0}")]
    Credentials(#[from] FileError),
    /// `proxy_authorization_file` does not hold `user:password`.
    #[error("proxy_authorization_file {}: must hold user:password on one line", .0.display())]
    NotUserPassword(PathBuf),
    /// The target has no host.
    #[error("{0}: no host to open a tunnel to")]
    NoHost(String),
}

/// `host:port` of `uri`, with the scheme's port when it names none.
fn authority_of(uri: &Uri) -> Option<String> {
    let host = uri.host()?;
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    Some(format!("{host}:{port}"))
}

/// The proxy as messages name it: `host:port` (the matcher has already taken out any
/// `user:password@` of an environment variable).
fn proxy_authority(uri: &Uri) -> String {
    authority_of(uri).unwrap_or_else(|| uri.to_string())
}

/// Connects to the proxy and asks it for a tunnel to `target`, within `timeout`.
async fn tunnel(
    mut tcp: HttpConnector,
    intercept: Intercept,
    target: Uri,
    egress: Arc<Egress>,
    timeout: Duration,
) -> Result<TokioIo<TcpStream>, BoxError> {
    let proxy = proxy_authority(intercept.uri());
    let Some(to) = authority_of(&target) else {
        return Err(TunnelError::NoHost(target.to_string()).into());
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let opening = async {
        let authorization = match &egress.authorization_file {
            Some(path) => Some(basic_from_file(path, deadline).await?),
            None => intercept
                .basic_auth()
                .map(|value| Zeroizing::new(value.as_bytes().to_vec())),
        };
        let io = tcp
            .call(intercept.uri().clone())
            .await
            .map_err(|source| TunnelError::Dial {
                proxy: proxy.clone(),
                target: to.clone(),
                source: source.into(),
            })?;
        let mut stream = io.into_inner();
        connect(
            &mut stream,
            &proxy,
            &to,
            authorization.as_ref().map(|a| a.as_slice()),
        )
        .await?;
        Ok::<_, TunnelError>(TokioIo::new(stream))
    };
    match tokio::time::timeout_at(deadline, opening).await {
        Ok(Ok(io)) => Ok(io),
        Ok(Err(error)) => Err(error.into()),
        // As an io::Error of kind TimedOut, which the proxy and token paths count as a
        // connect timeout, like HttpConnector's own.
        Err(_elapsed) => Err(Box::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            TunnelError::Timeout {
                proxy,
                target: to,
                after: timeout,
            },
        ))),
    }
}

/// `Basic base64(user:password)` of the file at `path`, read now (a rotated Secret is used
/// at the next tunnel).
async fn basic_from_file(
    path: &std::path::Path,
    deadline: tokio::time::Instant,
) -> Result<Zeroizing<Vec<u8>>, TunnelError> {
    let contents = files::read(path, Content::Secret, deadline).await?;
    let pair = user_password(&contents, path)?;
    let mut value = Zeroizing::new(b"Basic ".to_vec());
    let encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(pair));
    value.extend_from_slice(encoded.as_bytes());
    Ok(value)
}

/// Sends `CONNECT to` on `stream` and reads the proxy's answer up to the end of its headers.
async fn connect(
    stream: &mut TcpStream,
    proxy: &str,
    to: &str,
    authorization: Option<&[u8]>,
) -> Result<(), TunnelError> {
    let protocol = |reason: String| TunnelError::Protocol {
        proxy: proxy.to_owned(),
        target: to.to_owned(),
        reason,
    };
    let mut request = Zeroizing::new(Vec::with_capacity(256));
    request.extend_from_slice(format!("CONNECT {to} HTTP/1.1\r\nHost: {to}\r\n").as_bytes());
    if let Some(value) = authorization {
        request.extend_from_slice(b"Proxy-Authorization: ");
        request.extend_from_slice(value);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"\r\n");
    stream
        .write_all(&request)
        .await
        .map_err(|e| protocol(format!("sending the request: {e}")))?;
    let mut answer = Vec::with_capacity(512);
    let mut chunk = [0_u8; 512];
    let end = loop {
        let read = stream
            .read(&mut chunk)
            .await
            .map_err(|e| protocol(format!("reading the answer: {e}")))?;
        if read == 0 {
            return Err(protocol("it closed the connection".into()));
        }
        // Only the new bytes and the two before them can complete the blank line.
        let from = answer.len().saturating_sub(2);
        answer.extend_from_slice(&chunk[..read]);
        if let Some(end) = header_end(&answer, from) {
            break end;
        }
        if answer.len() > MAX_ANSWER_BYTES {
            return Err(protocol(format!(
                "its answer's headers run past {MAX_ANSWER_BYTES} bytes"
            )));
        }
    };
    let status =
        status_of(&answer).ok_or_else(|| protocol("not an HTTP/1.x status line".into()))?;
    if status.is_success() {
        // The tunnel's first bytes are the client's (TLS, an HTTP request, the h2c preface):
        // a proxy that already sent more is not one to trust with them.
        if answer.len() > end {
            return Err(protocol("it sent data before the tunnel was used".into()));
        }
        return Ok(());
    }
    let (proxy, target) = (proxy.to_owned(), to.to_owned());
    Err(match status {
        StatusCode::PROXY_AUTHENTICATION_REQUIRED | StatusCode::UNAUTHORIZED => {
            TunnelError::AuthenticationRequired {
                proxy,
                target,
                status,
                hint: if authorization.is_some() {
                    "it refused the credentials of proxy_authorization_file"
                } else {
                    "it wants credentials: set [egress] proxy_authorization_file"
                },
            }
        }
        status => TunnelError::Refused {
            proxy,
            target,
            status,
            hint: match status {
                StatusCode::FORBIDDEN => ": the proxy does not allow this host or port",
                StatusCode::INTERNAL_SERVER_ERROR => {
                    ": the proxy failed, often as it could not reach the host"
                }
                StatusCode::BAD_GATEWAY
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT => ": the proxy could not reach it",
                _ => "",
            },
        },
    })
}

/// Where the headers of `answer` end (after the blank line, CRLF or bare LF as RFC 9112
/// §2.2 lets a recipient accept), looking at line feeds from `from` on.
fn header_end(answer: &[u8], from: usize) -> Option<usize> {
    (from..answer.len()).find_map(|i| {
        if answer[i] != b'\n' {
            return None;
        }
        match answer.get(i + 1..) {
            Some([b'\n', ..]) => Some(i + 2),
            Some([b'\r', b'\n', ..]) => Some(i + 3),
            _ => None,
        }
    })
}

/// The status of an `HTTP/1.x NNN reason` line.
fn status_of(answer: &[u8]) -> Option<StatusCode> {
    let line = answer.split(|&b| b == b'\n').next()?;
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    if rest.get(1) != Some(&b' ')
        || rest
            .get(5)
            .is_some_and(|b| !matches!(b, b' ' | b'\r' | b'\n'))
    {
        return None;
    }
    StatusCode::from_bytes(code).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn egress(no_proxy: &[&str]) -> Egress {
        Egress::new(&config::Egress {
            proxy: EgressProxy::Fixed(Uri::from_static("http://proxy.corp:3128")),
            no_proxy: no_proxy.iter().map(|s| (*s).to_owned()).collect(),
            authorization_file: None,
        })
    }

    #[test]
    fn no_proxy_takes_suffixes_and_networks() {
        let egress = egress(&[".svc.cluster.local", "10.0.0.0/8"]);
        let way = |url: &'static str| egress.way(&Uri::from_static(url));
        assert_eq!(
            way("https://login.example.com/token"),
            Way::Proxy("proxy.corp:3128".into())
        );
        assert_eq!(
            way("http://api.example.com"),
            Way::Proxy("proxy.corp:3128".into())
        );
        assert_eq!(way("http://api.ns.svc.cluster.local:8080"), Way::NoProxy);
        assert_eq!(way("https://10.1.2.3"), Way::NoProxy);
        assert_eq!(
            way("https://11.1.2.3"),
            Way::Proxy("proxy.corp:3128".into())
        );
    }

    #[test]
    fn the_environment_proxies_only_the_schemes_it_names() {
        let env = config::proxy_env(&|name| {
            (name == "HTTPS_PROXY").then(|| "http://alice:pw@proxy.env:8080".to_owned())
        });
        let egress = Egress::new(&config::Egress {
            proxy: EgressProxy::Environment(env),
            no_proxy: Vec::new(),
            authorization_file: None,
        });
        assert_eq!(
            egress.way(&Uri::from_static("https://a.example")),
            Way::Proxy("proxy.env:8080".into())
        );
        assert_eq!(
            egress.way(&Uri::from_static("http://a.example")),
            Way::Direct
        );
    }

    #[test]
    fn headers_end_at_a_blank_line_of_crlf_or_lf() {
        let crlf = b"HTTP/1.1 200 OK\r\nX: y\r\n\r\n";
        assert_eq!(header_end(crlf, 0), Some(crlf.len()));
        let lf = b"HTTP/1.1 200 OK\nX: y\n\n";
        assert_eq!(header_end(lf, 0), Some(lf.len()));
        assert_eq!(header_end(b"HTTP/1.1 200 OK\r\nX: y\r\n", 0), None);
        let more = b"HTTP/1.1 200 OK\r\n\r\nextra";
        assert_eq!(header_end(more, 0), Some(more.len() - 5));
    }

    #[test]
    fn status_lines_are_read_strictly() {
        assert_eq!(
            status_of(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            Some(StatusCode::OK)
        );
        assert_eq!(
            status_of(b"HTTP/1.0 407\r\n"),
            Some(StatusCode::PROXY_AUTHENTICATION_REQUIRED)
        );
        assert_eq!(status_of(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_of(b"HTTP/1.1 403\n\n"), Some(StatusCode::FORBIDDEN));
        assert_eq!(status_of(b"HTTP/1.1 2000 x\r\n"), None);
        assert_eq!(status_of(b""), None);
    }
}
