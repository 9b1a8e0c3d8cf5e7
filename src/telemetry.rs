//! OpenTelemetry traces (`[telemetry]`): a server span per proxied request, a client span per
//! upstream attempt, a span per token fetch, exported over OTLP/HTTP in the background.
//!
//! In data-flow order:
//! - [`Telemetry::request`] starts a request's server span, the child of the app's W3C
//!   `traceparent`/`tracestate` when it sent one (W3C Trace Context §3), as a [`RequestTrace`]
//!   that `proxy::forward` hands down by reference and ends with the status
//!   ([`RequestTrace::finish`]);
//! - [`RequestTrace::attempt`] wraps each request sent upstream in a client span (an
//!   [`Attempt`], ended with the upstream's answer) and replaces `traceparent` (and
//!   `tracestate`) with bearerd's own, so a replay after a 401 shows as a second attempt;
//! - [`FetchTracing`] gives every token fetch a span of its own trace, always sampled, which
//!   [`link_to_fetch`] links from the requests whose answer waited on it;
//! - spans are batched by the SDK's batch processor on the Tokio runtime and posted by
//!   opentelemetry-otlp (protobuf, over opentelemetry-http's hyper client on bearerd's TLS
//!   connector). [`Admission`] bounds the spans held in memory, and [`Counting`] counts those
//!   lost to a full queue or a failed export in `bearerd_telemetry_spans_dropped_total` and
//!   logs once per outage: a collector that is down, slow or failing costs requests nothing.
//!
//! What spans carry is listed in docs/telemetry.md; never a header value, query, token,
//! secret, assertion or subject. When `[telemetry]` is absent no [`Telemetry`] exists, and the
//! proxy's hooks are one `Option` check each.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, StatusCode};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Link, Span as _, SpanBuilder, SpanContext, SpanKind, Status, TraceContextExt, TraceFlags,
    TraceId, TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, Sampler, SamplingDecision, SamplingResult, SdkTracer, SdkTracerProvider,
    ShouldSample, SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use prometheus::IntCounter;

use crate::config;
use crate::egress::Egress;
use crate::metrics::{Metrics, MetricsError};

/// Spans held between their end and their export (the queue's bound): beyond it, new spans
/// are dropped and counted.
pub(crate) const MAX_QUEUED_SPANS: usize = 2048;
/// Spans per OTLP request.
const MAX_BATCH: usize = 512;
/// How often a partial batch is sent.
const EXPORT_INTERVAL: Duration = Duration::from_secs(1);
/// How long one export may take (connect included) before its spans are dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for the last spans to be sent.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// The name of a token fetch's span; the sampler keeps every one.
pub(crate) const FETCH_SPAN: &str = "token fetch";
/// The W3C Trace Context headers bearerd writes on upstream requests.
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// The instrumentation scope's name.
const SCOPE: &str = "bearerd";

/// `[telemetry]` could not be started.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TelemetryError {
    /// opentelemetry-otlp refused the exporter's settings.
    #[error("[telemetry]: cannot build the OTLP exporter for {url}: {reason}")]
    Exporter {
        /// Where spans were to go.
        url: String,
        /// Why not.
        reason: String,
    },
    /// The drop counter could not be registered.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

/// The tracer and what it exports through; one per sidecar, shared by every route and token
/// source.
pub(crate) struct Telemetry {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    queue: Arc<Queue>,
}

impl Telemetry {
    /// Starts the exporter of `settings` on the current Tokio runtime, counting drops in a
    /// counter registered in `metrics`.
    pub(crate) fn start(
        settings: &config::Telemetry,
        metrics: &Metrics,
        egress: Option<&Arc<Egress>>,
    ) -> Result<Arc<Self>, TelemetryError> {
        let dropped = IntCounter::new(
            "bearerd_telemetry_spans_dropped_total",
            "Spans not exported: the queue was full, or the collector failed or timed out",
        )
        .map_err(MetricsError::from)?;
        let dropped = metrics.register(dropped)?;
        let queue = Arc::new(Queue {
            held: AtomicUsize::new(0),
            limit: MAX_QUEUED_SPANS,
            dropped,
            failing: AtomicBool::new(false),
            flush_on_shutdown: AtomicBool::new(false),
        });
        let url = settings.traces_url.to_string();
        let client = http_client(egress).map_err(|reason| TelemetryError::Exporter {
            url: url.clone(),
            reason,
        })?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| TelemetryError::Exporter {
                url,
                reason: e.to_string(),
            })?;
        let batches = BatchSpanProcessor::builder(
            Counting {
                inner: exporter,
                queue: Arc::clone(&queue),
            },
            opentelemetry_sdk::runtime::Tokio,
        )
        .with_batch_config(
            BatchConfigBuilder::default()
                // Never the one to drop: `Admission` holds at most `limit` spans, and a few
                // control messages share the channel.
                .with_max_queue_size(MAX_QUEUED_SPANS + 64)
                .with_max_export_batch_size(MAX_BATCH)
                .with_scheduled_delay(EXPORT_INTERVAL)
                .with_max_export_timeout(EXPORT_TIMEOUT)
                .build(),
        )
        .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Admission {
                inner: batches,
                queue: Arc::clone(&queue),
            })
            .with_sampler(Sampling::new(settings.sample_ratio))
            .with_resource(
                Resource::builder_empty()
                    .with_service_name(settings.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer(SCOPE);
        Ok(Arc::new(Self {
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
            queue,
        }))
    }

    /// Sends the spans still queued (bounded by the export timeout) and stops the exporter.
    pub(crate) async fn shutdown(&self) {
        self.queue.flush_on_shutdown.store(true, Ordering::Relaxed);
        let provider = self.provider.clone();
        // The SDK waits for its batch task by blocking the thread: not a runtime thread.
        let flushed =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT));
        if let Ok(Ok(Err(error))) =
            tokio::time::timeout(SHUTDOWN_TIMEOUT + EXPORT_TIMEOUT, flushed).await
        {
            tracing::debug!(%error, "telemetry: the last spans were not all exported");
        }
    }

    /// Starts the server span of `request`, which `route` (upstream `host`) serves, the child
    /// of the app's `traceparent` when it sent one. Only what is listed in docs/telemetry.md is
    /// recorded: the method, the path without its query, the route and the upstream's host.
    pub(crate) fn request<B>(
        &self,
        route: &str,
        upstream: &http::uri::Authority,
        request: &Request<B>,
    ) -> RequestTrace<'_> {
        let parent = self.propagator.extract(&Extractor(request.headers()));
        let method = request.method();
        let mut span = self
            .tracer
            .build_with_context(builder(method, SpanKind::Server), &parent);
        // Attributes are made only for the spans that are kept (most are not: the ratio).
        if span.is_recording() {
            let method = method.as_str();
            span.update_name(format!("{method} {route}"));
            span.set_attributes([
                KeyValue::new("http.request.method", method.to_owned()),
                KeyValue::new("url.path", request.uri().path().to_owned()),
                KeyValue::new("bearerd.route", route.to_owned()),
                KeyValue::new("bearerd.upstream.host", upstream.host().to_owned()),
            ]);
        }
        RequestTrace {
            tracer: &self.tracer,
            cx: parent.with_span(span),
            attempts: AtomicU32::new(0),
        }
    }

    /// What a token source's fetches are traced with.
    pub(crate) fn fetches(self: &Arc<Self>, settings: &config::TokenSettings) -> FetchTracing {
        FetchTracing {
            telemetry: Arc::clone(self),
            grant: settings.grant_name(),
            method: settings.auth.method(),
            endpoint: settings.url.host().unwrap_or_default().to_owned(),
        }
    }
}

/// A traced request: the context of its server span ([`Telemetry::request`]), which its
/// upstream attempts' client spans are children of. Handed down the forward by reference
/// rather than kept in a task-local context: wrapping the forward in another future made
/// hyper move a request's whole future several more times (callgrind: about 10,000
/// instructions per traced request).
pub(crate) struct RequestTrace<'a> {
    tracer: &'a SdkTracer,
    cx: Context,
    attempts: AtomicU32,
}

impl RequestTrace<'_> {
    /// The request's context, for the wait on a token (which links to the fetch it waited on,
    /// [`link_to_fetch`]).
    pub(crate) fn context(&self) -> &Context {
        &self.cx
    }

    /// Starts the client span of an attempt about to be sent upstream to `url` (scheme,
    /// authority and path; no query), and puts its `traceparent` (and the `tracestate` it
    /// carries on) in `headers` in place of the app's. The span ends with
    /// [`Attempt::ended`], or when it is dropped (the request was abandoned).
    pub(crate) fn attempt(
        &self,
        headers: &mut HeaderMap,
        method: &Method,
        authority: &http::uri::Authority,
        url: impl FnOnce() -> String,
    ) -> Attempt {
        let number = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        let mut span = self
            .tracer
            .build_with_context(builder(method, SpanKind::Client), &self.cx);
        if span.is_recording() {
            let mut attributes = vec![
                KeyValue::new("http.request.method", method.as_str().to_owned()),
                KeyValue::new("server.address", authority.host().to_owned()),
                KeyValue::new("url.full", url()),
                KeyValue::new("bearerd.attempt", i64::from(number)),
            ];
            if let Some(port) = authority.port_u16() {
                attributes.push(KeyValue::new("server.port", i64::from(port)));
            }
            span.set_attributes(attributes);
        }
        inject(span.span_context(), headers);
        Attempt(Box::new(span))
    }

    /// Ends the server span with the status of the answer. The span covers the request until
    /// the answer's head is handed back; the body streams after it.
    pub(crate) fn finish(self, status: StatusCode) {
        let span = self.cx.span();
        if !span.is_recording() {
            span.end();
            return;
        }
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
        // Semantic conventions: a server span fails on 5xx only.
        if status.is_server_error() {
            span.set_attribute(KeyValue::new("error.type", status.as_str().to_owned()));
            span.set_status(Status::error(""));
        }
        span.end();
    }
}

/// The client span of one upstream attempt (boxed: an attempt's future holds it, and the
/// untraced requests' futures should not grow by a span).
pub(crate) struct Attempt(Box<opentelemetry_sdk::trace::Span>);

impl Attempt {
    /// Ends the span with the upstream's status, or `failed` (an error code of bearerd's, as
    /// the app's error body names it).
    pub(crate) fn ended(mut self, outcome: Result<StatusCode, &'static str>) {
        let span = &mut self.0;
        if !span.is_recording() {
            span.end();
            return;
        }
        match outcome {
            Ok(status) => {
                span.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status.as_u16()),
                ));
                // Semantic conventions: a client span fails on 4xx and 5xx.
                if status.is_client_error() || status.is_server_error() {
                    span.set_attribute(KeyValue::new("error.type", status.as_str().to_owned()));
                    span.set_status(Status::error(""));
                }
            }
            Err(code) => {
                span.set_attribute(KeyValue::new("error.type", code));
                span.set_status(Status::error(""));
            }
        }
        span.end();
    }
}

/// A span named after `method`, of `kind`: filled in place, where the SDK's builder methods
/// move the whole builder at each call (callgrind counted the copies).
fn builder(method: &Method, kind: SpanKind) -> SpanBuilder {
    let mut builder = SpanBuilder::from_name(method_name(method));
    builder.span_kind = Some(kind);
    builder
}

/// The app's headers as the W3C propagator reads them: the two names it asks for are looked up
/// by their constants, where opentelemetry-http's extractor parses the name at every request.
struct Extractor<'a>(&'a HeaderMap);

impl opentelemetry::propagation::Extractor for Extractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let value = match key {
            "traceparent" => self.0.get(TRACEPARENT),
            "tracestate" => self.0.get(TRACESTATE),
            other => self.0.get(other),
        };
        value.and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// A span's name: the method, without an allocation for the standard ones.
fn method_name(method: &Method) -> std::borrow::Cow<'static, str> {
    const STANDARD: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
    ];
    match STANDARD.iter().find(|name| **name == method.as_str()) {
        Some(name) => std::borrow::Cow::Borrowed(name),
        None => std::borrow::Cow::Owned(method.as_str().to_owned()),
    }
}

/// Puts `span`'s W3C `traceparent` in `headers`, and its `tracestate` (or none), in place of
/// the app's: what the SDK's `TraceContextPropagator` writes (a test holds them equal),
/// written into a fixed buffer, where the propagator's `format!` and header-name parsing cost
/// about 3,000 instructions per request (callgrind).
fn inject(span: &SpanContext, headers: &mut HeaderMap) {
    if !span.is_valid() {
        return;
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // version "-" trace id "-" span id "-" flags, each byte as two lowercase hex digits.
    let trace_id = span.trace_id().to_bytes();
    let span_id = span.span_id().to_bytes();
    let flags = [(span.trace_flags() & TraceFlags::SAMPLED).to_u8()];
    let mut value = [b'-'; 55];
    let mut at = 0;
    for part in [&[0_u8][..], &trace_id, &span_id, &flags] {
        for byte in part {
            value[at] = HEX[usize::from(byte >> 4)];
            value[at + 1] = HEX[usize::from(byte & 0x0f)];
            at += 2;
        }
        at += 1; // the dash
    }
    if let Ok(traceparent) = HeaderValue::from_bytes(&value) {
        headers.insert(TRACEPARENT, traceparent);
    }
    let state = span.trace_state().header();
    match HeaderValue::from_str(&state) {
        Ok(value) if !state.is_empty() => {
            headers.insert(TRACESTATE, value);
        }
        _ => {
            headers.remove(TRACESTATE);
        }
    }
}

/// Links the span of the request running now (if it is traced) to the token fetch whose
/// outcome its answer waited on. Called on the token's slow path only.
pub(crate) fn link_to_fetch(fetch: &SpanContext) {
    Context::map_current(|cx| {
        if cx.has_active_span() {
            cx.span().add_link(fetch.clone(), Vec::new());
        }
    });
}

/// What a token source's fetch spans say about it: never its secret, token, assertion or
/// subject.
pub(crate) struct FetchTracing {
    telemetry: Arc<Telemetry>,
    grant: &'static str,
    method: &'static str,
    endpoint: String,
}

impl FetchTracing {
    /// Starts the span of one fetch, the root of a trace of its own.
    pub(crate) fn start(&self) -> opentelemetry_sdk::trace::Span {
        let tracer = &self.telemetry.tracer;
        tracer
            .span_builder(FETCH_SPAN)
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("bearerd.token.grant", self.grant),
                KeyValue::new("bearerd.token.client_auth", self.method),
                KeyValue::new("server.address", self.endpoint.clone()),
            ])
            .start_with_context(tracer, &Context::new())
    }
}

/// Ends a fetch's span with its `outcome` (the label `bearerd_token_fetches_total` uses), the
/// token endpoint's status when it answered with an error, and whether the token came from
/// the cache; returns its context, which requests link to.
pub(crate) fn fetch_ended(
    mut span: opentelemetry_sdk::trace::Span,
    outcome: &'static str,
    status: Option<StatusCode>,
    from_cache: bool,
) -> SpanContext {
    span.set_attribute(KeyValue::new("bearerd.token.outcome", outcome));
    span.set_attribute(KeyValue::new("bearerd.token.from_cache", from_cache));
    if let Some(status) = status {
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
    }
    if outcome != "success" {
        span.set_attribute(KeyValue::new("error.type", outcome));
        span.set_status(Status::error(""));
    }
    let context = span.span_context().clone();
    span.end();
    context
}

/// The sampler: every token fetch; requests by their parent's sampled flag, or by the ratio
/// when they have none.
#[derive(Debug, Clone)]
struct Sampling {
    requests: Sampler,
}

impl Sampling {
    fn new(ratio: f64) -> Self {
        Self {
            requests: Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))),
        }
    }
}

impl ShouldSample for Sampling {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        // Fetches are few, and the traces of the requests that waited link to them.
        if name == FETCH_SPAN && !parent_context.is_some_and(TraceContextExt::has_active_span) {
            return SamplingResult {
                decision: SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state: TraceState::default(),
            };
        }
        self.requests
            .should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}

/// The bound on spans waiting for export, and the count of those dropped. Shared by
/// [`Admission`], which takes spans in, and [`Counting`], which lets them out.
#[derive(Debug)]
struct Queue {
    /// Spans taken in and not yet exported or dropped.
    held: AtomicUsize,
    limit: usize,
    dropped: IntCounter,
    /// Whether the last export failed: an outage is logged once, at its start.
    failing: AtomicBool,
    /// Set by [`Telemetry::shutdown`]: only then does the SDK's shutdown (which blocks the
    /// thread) run; a provider merely dropped lets its batch task end on its own.
    flush_on_shutdown: AtomicBool,
}

impl Queue {
    /// Notes the end of an export of `spans` spans: `Ok` sent, `Err` failed, `None` given up
    /// (the SDK's timeout dropped it).
    fn settled(&self, spans: usize, outcome: Option<&OTelSdkResult>) {
        self.held.fetch_sub(spans, Ordering::Relaxed);
        match outcome {
            Some(Ok(())) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("telemetry: the collector takes spans again");
                }
            }
            failed => {
                self.dropped.inc_by(spans as u64);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    let error = match failed {
                        Some(Err(error)) => error.to_string().chars().take(200).collect(),
                        _ => format!("no answer within {}s", EXPORT_TIMEOUT.as_secs()),
                    };
                    tracing::warn!(
                        %error,
                        "telemetry: exporting spans failed; spans are dropped (bearerd_telemetry_spans_dropped_total) until the collector takes them again"
                    );
                }
            }
        }
    }
}

/// A span processor in front of the SDK's batch processor that takes a sampled span only
/// while fewer than the queue's limit are held, and counts the others as dropped (the SDK
/// counts its own drops privately).
#[derive(Debug)]
struct Admission<P> {
    inner: P,
    queue: Arc<Queue>,
}

impl<P: SpanProcessor> SpanProcessor for Admission<P> {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.queue.held.fetch_add(1, Ordering::Relaxed) >= self.queue.limit {
            self.queue.held.fetch_sub(1, Ordering::Relaxed);
            self.queue.dropped.inc();
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        if self.queue.flush_on_shutdown.load(Ordering::Relaxed) {
            self.inner.shutdown_with_timeout(timeout)
        } else {
            Ok(())
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, with every export's spans let out of the [`Queue`] and, when the
/// export fails or is given up, counted as dropped.
#[derive(Debug)]
struct Counting<E> {
    inner: E,
    queue: Arc<Queue>,
}

/// An export under way; dropped unsettled (the SDK's timeout gave up on it), its spans are
/// counted as dropped.
struct Settle {
    queue: Arc<Queue>,
    spans: usize,
    done: bool,
}

impl Drop for Settle {
    fn drop(&mut self) {
        if !self.done {
            self.queue.settled(self.spans, None);
        }
    }
}

impl<E: SpanExporter> SpanExporter for Counting<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let mut settle = Settle {
            queue: Arc::clone(&self.queue),
            spans: batch.len(),
            done: false,
        };
        let export = self.inner.export(batch);
        async move {
            let result = export.await;
            settle.done = true;
            settle.queue.settled(settle.spans, Some(&result));
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The exporter's HTTP client: opentelemetry-http's hyper client on bearerd's connector
/// (TCP, through the `[egress]` proxy when the collector is not in `no_proxy`, then TLS with
/// the built-in roots for an `https` collector).
fn http_client(
    egress: Option<&Arc<Egress>>,
) -> Result<opentelemetry_http::hyper::HyperClient<crate::tls::Connector>, String> {
    let settings = config::TlsSettings {
        roots: config::Roots::default(),
        ca_file: None,
        identity: None,
    };
    let tls = crate::tls::client_config(&settings, None).map_err(|e| e.to_string())?;
    let connector = crate::tls::connector(tls, EXPORT_TIMEOUT, egress);
    Ok(opentelemetry_http::hyper::HyperClient::new(
        connector,
        EXPORT_TIMEOUT,
        None,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(limit: usize) -> Arc<Queue> {
        Arc::new(Queue {
            held: AtomicUsize::new(0),
            limit,
            dropped: IntCounter::new("d", "d").unwrap(),
            failing: AtomicBool::new(false),
            flush_on_shutdown: AtomicBool::new(false),
        })
    }

    #[test]
    fn failed_and_abandoned_exports_count_their_spans_as_dropped() {
        let queue = queue(10);
        queue.held.store(7, Ordering::Relaxed);
        queue.settled(3, Some(&Ok(())));
        assert_eq!(queue.dropped.get(), 0);
        queue.settled(
            2,
            Some(&Err(opentelemetry_sdk::error::OTelSdkError::Timeout(
                EXPORT_TIMEOUT,
            ))),
        );
        assert_eq!(queue.dropped.get(), 2);
        assert!(queue.failing.load(Ordering::Relaxed));
        drop(Settle {
            queue: Arc::clone(&queue),
            spans: 2,
            done: false,
        });
        assert_eq!(queue.dropped.get(), 4);
        assert_eq!(queue.held.load(Ordering::Relaxed), 0);
        queue.settled(0, Some(&Ok(())));
        assert!(!queue.failing.load(Ordering::Relaxed), "recovered");
    }

    #[test]
    fn traceparent_and_tracestate_are_what_the_sdk_propagator_writes() {
        let vendor = TraceState::from_key_value([("vendor", "abc")]).unwrap();
        for (flags, state) in [
            (TraceFlags::SAMPLED, vendor),
            (TraceFlags::default(), TraceState::default()),
        ] {
            let span = SpanContext::new(
                TraceId::from(0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c_u128),
                opentelemetry::trace::SpanId::from(0x00f0_67aa_0ba9_02b7_u64),
                flags,
                false,
                state,
            );
            let mut ours = HeaderMap::new();
            ours.insert("traceparent", HeaderValue::from_static("00-app"));
            ours.insert("tracestate", HeaderValue::from_static("app=1"));
            inject(&span, &mut ours);
            let mut sdk = std::collections::HashMap::new();
            TraceContextPropagator::new().inject_context(
                &Context::new().with_remote_span_context(span.clone()),
                &mut sdk,
            );
            assert_eq!(ours["traceparent"], sdk["traceparent"]);
            match sdk["tracestate"].as_str() {
                // The app's goes, and no empty header comes in its place.
                "" => assert!(ours.get("tracestate").is_none()),
                state => assert_eq!(ours["tracestate"], state),
            }
        }
    }

    #[test]
    fn span_names_of_standard_methods_are_not_allocated() {
        assert!(matches!(
            method_name(&Method::GET),
            std::borrow::Cow::Borrowed("GET")
        ));
        let purge = Method::from_bytes(b"PURGE").unwrap();
        assert_eq!(method_name(&purge), "PURGE");
    }

    #[test]
    fn fetches_are_always_sampled_and_requests_by_ratio() {
        let never = Sampling::new(0.0);
        let decide = |name: &str| {
            never
                .should_sample(
                    Some(&Context::new()),
                    TraceId::from(7_u128),
                    name,
                    &SpanKind::Server,
                    &[],
                    &[],
                )
                .decision
        };
        assert_eq!(decide(FETCH_SPAN), SamplingDecision::RecordAndSample);
        assert_eq!(decide("GET"), SamplingDecision::Drop);
    }
}
