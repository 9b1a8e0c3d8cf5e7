//! The two servers `make demo` runs next to bearerd (see `scripts/demo.sh`), so that the
//! proxy can be tried without a real identity provider or API.
//!
//! - A demo OAuth2 token endpoint, `POST /oauth/token`, which checks a client-credentials
//!   request (RFC 6749 §4.4.2) the way a real one does: form content type, `grant_type`, and
//!   the client `demo-client` / `demo-secret`, by HTTP Basic (§2.3.1, the id and secret
//!   form-urlencoded before base64) or in the form body. It issues `demo-token-1`,
//!   `demo-token-2`, ... valid for 60 s, so bearerd's refreshes show in the log.
//! - An echo upstream, which answers any request that carries `Authorization: Bearer ...`
//!   with a JSON description of that request: the method, path and query, and headers as
//!   received, the injected `authorization` among them.
//!
//! Both listen on loopback only, speak HTTP/1.1, and stop on SIGINT or SIGTERM:
//!
//! ```text
//! cargo run --example demo_servers -- --token-listen 127.0.0.1:18080 --echo-listen 127.0.0.1:18081
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The only client the token endpoint knows.
const CLIENT_ID: &str = "demo-client";
/// Its secret (the demo's `examples/demo-secret.txt`). Never logged.
const CLIENT_SECRET: &str = "demo-secret";
/// The only scope granted.
const SCOPE: &str = "demo";
/// Lifetime of issued tokens: short, so that bearerd refreshes within a minute.
const EXPIRES_IN_SECS: u64 = 60;
/// Largest token request body read.
const MAX_FORM_BYTES: usize = 16 * 1024;
/// How long open connections may take to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

const USAGE: &str = "usage: demo_servers [--token-listen ADDR] [--echo-listen ADDR]
  --token-listen ADDR   demo OAuth2 token endpoint (default 127.0.0.1:18080)
  --echo-listen ADDR    echo upstream (default 127.0.0.1:18081)";

/// Command-line arguments.
struct Args {
    token_listen: SocketAddr,
    echo_listen: SocketAddr,
}

/// What the command line asked for.
enum Command {
    Run(Args),
    Help,
}

/// Parses `--token-listen ADDR` and `--echo-listen ADDR` (also `--flag=ADDR`).
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Command, String> {
    let mut token_listen = SocketAddr::from(([127, 0, 0, 1], 18080));
    let mut echo_listen = SocketAddr::from(([127, 0, 0, 1], 18081));
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg, None),
        };
        let target = match flag.as_str() {
            "--token-listen" => &mut token_listen,
            "--echo-listen" => &mut echo_listen,
            _ => return Err(format!("unknown argument {flag:?}")),
        };
        let Some(value) = inline.or_else(|| args.next()) else {
            return Err(format!("{flag} needs an address such as 127.0.0.1:18080"));
        };
        *target = value.parse().map_err(|_| {
            format!("{flag}: {value:?} is not an IP address and port such as 127.0.0.1:18080")
        })?;
    }
    Ok(Command::Run(Args {
        token_listen,
        echo_listen,
    }))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Run(args)) => args,
        Ok(Command::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("demo_servers: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("demo_servers: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(&args))
}

async fn run(args: &Args) -> ExitCode {
    // Both binds are tried, so that each busy address is reported.
    let token_listener = bind(args.token_listen, "token endpoint").await;
    let echo_listener = bind(args.echo_listen, "echo upstream").await;
    let (Ok(token_listener), Ok(echo_listener)) = (token_listener, echo_listener) else {
        return ExitCode::FAILURE;
    };

    let (stop, stopped) = watch::channel(false);
    let issued = Arc::new(AtomicU64::new(0));
    let token_server = tokio::spawn(serve(
        token_listener,
        "token endpoint",
        move |request| token_endpoint(request, Arc::clone(&issued)),
        stopped.clone(),
    ));
    let echo_server = tokio::spawn(serve(echo_listener, "echo upstream", echo, stopped));

    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop.send(true);
    for server in [token_server, echo_server] {
        if let Err(error) = server.await {
            tracing::error!(%error, "server task failed");
        }
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

async fn bind(addr: SocketAddr, role: &str) -> Result<TcpListener, ()> {
    match TcpListener::bind(addr).await {
        Ok(listener) => {
            tracing::info!("{role} listening on http://{addr}");
            Ok(listener)
        }
        Err(error) => {
            let hint = if error.kind() == std::io::ErrorKind::AddrInUse {
                " (is another demo still running?)"
            } else {
                ""
            };
            tracing::error!("cannot listen on {addr} for the {role}: {error}{hint}");
            Err(())
        }
    }
}

/// Accepts HTTP/1.1 connections for `handler` until `stop` turns true, then lets open
/// connections finish for up to [`SHUTDOWN_GRACE`].
async fn serve<H, F>(
    listener: TcpListener,
    role: &'static str,
    handler: H,
    mut stop: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let connections = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            // Also ends if the sender is gone. The guard `wait_for` returns is not `Send`.
            () = async { let _ = stop.wait_for(|stop| *stop).await; } => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(%error, "{role}: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let handler = handler.clone();
        let service = hyper::service::service_fn(move |request| {
            let response = handler(request);
            async move { Ok::<_, Infallible>(response.await) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service);
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "{role}: connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, connections.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("{role}: connections still open after {SHUTDOWN_GRACE:?}, closing them");
    }
}

/// The demo token endpoint.
async fn token_endpoint(
    request: Request<Incoming>,
    issued: Arc<AtomicU64>,
) -> Response<Full<Bytes>> {
    if request.uri().path() != "/oauth/token" {
        return json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": "not_found", "error_description": "the token endpoint is POST /oauth/token"}),
        );
    }
    if request.method() != Method::POST {
        tracing::warn!("token request rejected: {} is not POST", request.method());
        let mut response = oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "the token endpoint takes POST",
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    match issue_token(request, &issued).await {
        Ok(response) => response,
        Err(rejection) => {
            tracing::warn!(
                "token request rejected: {} {}: {}",
                rejection.status.as_u16(),
                rejection.error,
                rejection.description
            );
            let mut response =
                oauth_error(rejection.status, rejection.error, &rejection.description);
            if rejection.status == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"demo\""),
                );
            }
            response
        }
    }
}

/// A token request refused, as RFC 6749 §5.2 describes it.
struct Rejection {
    status: StatusCode,
    error: &'static str,
    description: String,
}

fn reject(status: StatusCode, error: &'static str, description: impl Into<String>) -> Rejection {
    Rejection {
        status,
        error,
        description: description.into(),
    }
}

/// Checks a POST to the token endpoint and issues the next token.
async fn issue_token(
    request: Request<Incoming>,
    issued: &AtomicU64,
) -> Result<Response<Full<Bytes>>, Rejection> {
    let bad_request = |description: &str| {
        reject(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            description.to_owned(),
        )
    };
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim)
        .unwrap_or_default();
    if !content_type.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(bad_request(
            "Content-Type must be application/x-www-form-urlencoded",
        ));
    }
    let basic = match request.headers().get(AUTHORIZATION) {
        None => None,
        Some(value) => Some(basic_credentials(value).ok_or_else(|| {
            reject(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "the Authorization header is not HTTP Basic with a form-urlencoded id:secret",
            )
        })?),
    };
    let body = Limited::new(request.into_body(), MAX_FORM_BYTES)
        .collect()
        .await
        .map_err(|_| bad_request("the body is unreadable or too large"))?
        .to_bytes();
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let field = |name: &str| -> Result<Option<&str>, Rejection> {
        let mut values = form
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str());
        let first = values.next();
        if values.next().is_some() {
            return Err(bad_request(&format!("{name} is given more than once")));
        }
        Ok(first)
    };

    match field("grant_type")? {
        None => return Err(bad_request("grant_type is missing")),
        Some("client_credentials") => {}
        Some(other) => {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                format!("grant_type {other:?} is not supported; use client_credentials"),
            ))
        }
    }

    // client_secret_basic, or client_secret_post with both fields in the form; never both.
    let (client_id, client_secret) = match (basic, field("client_id")?, field("client_secret")?) {
        (Some(_), _, Some(_)) => {
            return Err(bad_request(
                "the client authenticated both by HTTP Basic and in the body; use one",
            ))
        }
        (Some((id, secret)), _, None) => (id, secret),
        (None, Some(id), Some(secret)) => (id.to_owned(), secret.to_owned()),
        (None, _, _) => {
            return Err(reject(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "no client authentication: send HTTP Basic credentials",
            ))
        }
    };
    if client_id != CLIENT_ID || client_secret != CLIENT_SECRET {
        return Err(reject(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            format!("unknown client {client_id:?} or wrong secret"),
        ));
    }

    if let Some(scope) = field("scope")? {
        if let Some(unknown) = scope.split(' ').find(|s| !s.is_empty() && *s != SCOPE) {
            return Err(reject(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                format!("scope {unknown:?} is not granted; only {SCOPE:?} is"),
            ));
        }
    }

    let n = issued.fetch_add(1, Ordering::Relaxed) + 1;
    let access_token = format!("demo-token-{n}");
    tracing::info!(
        "token request from {client_id:?}: issued {access_token}, expires in {EXPIRES_IN_SECS} s"
    );
    let mut response = json_response(
        StatusCode::OK,
        &json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": EXPIRES_IN_SECS,
            "scope": SCOPE,
        }),
    );
    // RFC 6749 §5.1: token responses must not be cached.
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// The client id and secret of `Basic base64(urlencode(id):urlencode(secret))`.
fn basic_credentials(value: &HeaderValue) -> Option<(String, String)> {
    let value = value.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((form_urldecode(id)?, form_urldecode(secret)?))
}

/// Decodes one application/x-www-form-urlencoded value: `+` is a space, `%XX` a byte.
fn form_urldecode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        rest = tail;
        match byte {
            b'+' => bytes.push(b' '),
            b'%' => {
                let (hex, tail) = rest.split_at_checked(2)?;
                bytes.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                rest = tail;
            }
            other => bytes.push(other),
        }
    }
    String::from_utf8(bytes).ok()
}

/// The echo upstream: describes the request it received, if it carries a bearer token.
async fn echo(request: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let bearer = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty())
        .map(|(_, token)| token.trim().to_owned());
    let Some(token) = bearer else {
        tracing::warn!(
            "echo: {} {path}: no bearer token, answering 401",
            request.method()
        );
        let mut response = json_response(
            StatusCode::UNAUTHORIZED,
            &json!({
                "error": "unauthorized",
                "error_description": "this upstream needs an Authorization: Bearer header; send the request through bearerd",
            }),
        );
        response.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"demo\""),
        );
        return response;
    };
    tracing::info!("echo: {} {path} with token {token}", request.method());

    // Read the body to its end, as a real API does: an upstream that answers before it has
    // read the request closes the connection under the next one.
    let (parts, body) = request.into_parts();
    let mut body = std::pin::pin!(body);
    let mut body_bytes: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                body_bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
            Err(_) => break,
        }
    }

    let mut headers = Map::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.get_mut(name.as_str()) {
            // A repeated header: join the values, as a proxy may.
            Some(Value::String(joined)) => {
                joined.push_str(", ");
                joined.push_str(&value);
            }
            _ => {
                headers.insert(name.as_str().to_owned(), Value::String(value));
            }
        }
    }
    json_response(
        StatusCode::OK,
        &json!({
            "method": parts.method.as_str(),
            "path": path,
            "headers": headers,
            "body_bytes": body_bytes,
        }),
    )
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

/// `value` as pretty JSON with a final newline, so it reads well in a terminal.
fn json_response(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".to_owned());
    body.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the demo servers");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_urldecode_decodes_plus_and_escapes() {
        assert_eq!(form_urldecode("a+b%3Ac%25").as_deref(), Some("a b:c%"));
        assert_eq!(
            form_urldecode("demo-secret").as_deref(),
            Some("demo-secret")
        );
        assert_eq!(form_urldecode("%4"), None);
        assert_eq!(form_urldecode("%zz"), None);
    }

    #[test]
    fn basic_credentials_are_url_decoded() {
        let encoded = base64::engine::general_purpose::STANDARD.encode("demo-client:s%3Acret+x");
        let value = HeaderValue::try_from(format!("Basic {encoded}")).unwrap();
        assert_eq!(
            basic_credentials(&value),
            Some(("demo-client".to_owned(), "s:cret x".to_owned()))
        );
    }

    #[test]
    fn args_parse_both_forms() {
        let args = |v: &[&str]| parse_args(v.iter().map(|s| (*s).to_owned()));
        let Ok(Command::Run(parsed)) =
            args(&["--token-listen", "127.0.0.1:1", "--echo-listen=127.0.0.1:2"])
        else {
            panic!("should parse");
        };
        assert_eq!(parsed.token_listen.port(), 1);
        assert_eq!(parsed.echo_listen.port(), 2);
        assert!(args(&["--token-listen"]).is_err());
        assert!(args(&["--bogus", "x"]).is_err());
    }
}
