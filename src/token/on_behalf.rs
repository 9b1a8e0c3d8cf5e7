//! On-behalf-of token exchange (RFC 8693 §1.1): the subject token comes from each app
//! request (`subject_token_from = "header:<Name>"`), and the token sent upstream is the one
//! the token endpoint exchanged it for.
//!
//! Unlike a source's one token, kept fresh by its refresher, these are fetched on demand and
//! kept per subject:
//! - known by the SHA-256 of the subject token ([`SubjectKey`]), never by the token itself, in
//!   memory, logs, metrics and the cache; audit events carry its fingerprint;
//! - at most `max_subjects` of them, the least recently used evicted first;
//! - never used past the subject token's own `exp` when it is a JWT (decoded, not verified:
//!   the endpoint verifies it; the claim only bounds how long its exchange is used);
//! - one flight per subject: requests of a subject whose token is being fetched wait for that
//!   fetch, and a subject's fetch never holds up another's;
//! - with the Redis cache, shared across the fleet ([`SubjectStore`]); never in the file cache.
//!
//! A subject the endpoint refuses (a 4xx that is about the subject, not about bearerd's client)
//! is forgotten at once, and its requests answered 401 `subject_token_rejected`; an endpoint
//! that fails is a 503, as for any source, and is not asked again for that subject before its
//! `Retry-After` (a second at least). There is no refresher: nothing gates `/readyz`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use http::{HeaderMap, HeaderName};
use tokio::time::Instant;

use super::audit;
use super::cache::SubjectStore;
use super::fetch::{FetchError, Fetcher};
use super::source::Unavailable;
use super::state::{SharedObservers, REJECTION_REFETCH_INTERVAL};
use super::Token;
use crate::config::OnBehalfOf;
use crate::secret::Secret;
use crate::telemetry::{self, FetchTracing};

/// How long a subject's requests get an endpoint's failure without another exchange, unless
/// its `Retry-After` says longer: a failing endpoint gets at most one exchange a second per
/// subject, however many requests arrive.
const FAILURE_BACKOFF: Duration = Duration::from_secs(1);
/// The most a `Retry-After` holds a subject's exchanges back.
const MAX_FAILURE_BACKOFF: Duration = Duration::from_secs(60);

/// The SHA-256 of a subject token: what names a subject everywhere bearerd keeps or says
/// anything of it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SubjectKey([u8; 32]);

impl SubjectKey {
    /// The key of `subject`.
    pub(crate) fn of(subject: &Secret) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, subject.expose().as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        Self(key)
    }

    /// base64url of the whole hash: the name of its cache entry.
    pub(crate) fn text(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.0)
    }

    /// Its first 16 characters: the `subject_hash` of audit events and logs, computed as a
    /// token's fingerprint is ([`audit::fingerprint`]).
    pub(crate) fn fingerprint(&self) -> String {
        let mut text = self.text();
        text.truncate(16);
        text
    }
}

impl std::fmt::Debug for SubjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SubjectKey({})", self.fingerprint())
    }
}

/// Why a request gets no on-behalf-of token.
#[derive(Debug, Clone)]
pub(crate) enum Refusal {
    /// The request carries no usable subject token: 401 `subject_token_missing`.
    Missing(&'static str),
    /// The token endpoint refused the subject, or it has expired: 401
    /// `subject_token_rejected`. The detail is bearerd's summary, never the endpoint's words
    /// beyond status and error code.
    Rejected(String),
    /// The token endpoint failed: 503 `token_unavailable`.
    Unavailable(Unavailable),
}

/// An on-behalf-of source: its fetcher, and the tokens of the subjects it has seen.
pub(crate) struct OnBehalf {
    settings: OnBehalfOf,
    fetcher: Fetcher,
    subjects: Mutex<Subjects>,
    /// With the Redis cache: the fleet's copies.
    cache: Option<SubjectStore>,
    observers: SharedObservers,
    /// `[telemetry]`: each exchange's span, which the requests that waited for it link to.
    tracing: Option<FetchTracing>,
}

/// The subjects held, with their order of use for eviction.
#[derive(Default)]
struct Subjects {
    by_key: HashMap<SubjectKey, Held>,
    /// Last use → subject: the first is the least recently used.
    by_use: BTreeMap<u64, SubjectKey>,
    uses: u64,
}

impl Subjects {
    /// The slot of `key`, if held, marked as just used.
    fn touch(&mut self, key: SubjectKey) -> Option<Arc<Slot>> {
        self.uses += 1;
        let now = self.uses;
        let held = self.by_key.get_mut(&key)?;
        let before = std::mem::replace(&mut held.used, now);
        let slot = Arc::clone(&held.slot);
        self.by_use.remove(&before);
        self.by_use.insert(now, key);
        Some(slot)
    }
}

struct Held {
    slot: Arc<Slot>,
    used: u64,
}

/// One subject: its token, and the lock its fetches take turns on.
struct Slot {
    key: SubjectKey,
    /// The subject token, to exchange again when an upstream rejects the token (it is a
    /// credential, held as long as its exchanged token is, and zeroed when dropped).
    subject: Secret,
    /// Its JWT `exp`, if it is a JWT with one.
    expires: Option<SystemTime>,
    /// Held by the fetch under way: one flight per subject.
    flight: tokio::sync::Mutex<()>,
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    token: Option<Arc<Token>>,
    /// Tokens obtained for the subject so far.
    generations: u64,
    /// Fetches finished so far, and how the last one failed: requests that waited for it get
    /// its outcome rather than fetching again each.
    flights: u64,
    failure: Option<Refusal>,
    /// After an endpoint failure (not a refusal of the subject): until when the subject's
    /// requests get that failure without another exchange, as `Retry-After` says.
    backing_off: Option<Instant>,
    /// The hash of the last token an upstream rejected: not taken from the cache again.
    refused: Option<String>,
    /// When an upstream's 401 last made it fetch.
    rejection_fetch: Option<Instant>,
}

impl Slot {
    fn state(&self) -> MutexGuard<'_, SlotState> {
        // Every change to the state is one assignment: a panic cannot leave it half-done.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn usable(&self, now: Instant) -> Option<Arc<Token>> {
        self.state()
            .token
            .as_ref()
            .filter(|t| t.is_usable_at(now))
            .cloned()
    }

    /// The failure its requests get without an exchange, while the endpoint's last failure
    /// asks them to wait.
    fn backing_off(&self, now: Instant) -> Option<Refusal> {
        let state = self.state();
        let until = state.backing_off.filter(|until| now < *until)?;
        match &state.failure {
            Some(Refusal::Unavailable(unavailable)) => Some(Refusal::Unavailable(Unavailable {
                detail: unavailable.detail.clone(),
                retry_after: until.saturating_duration_since(now),
            })),
            _ => None,
        }
    }
}

impl OnBehalf {
    /// The source of `settings`, fetching with `fetcher`, sharing tokens through `cache`.
    pub(crate) fn new(
        settings: OnBehalfOf,
        fetcher: Fetcher,
        cache: Option<SubjectStore>,
        observers: SharedObservers,
        tracing: Option<FetchTracing>,
    ) -> Self {
        Self {
            settings,
            fetcher,
            subjects: Mutex::new(Subjects::default()),
            cache,
            observers,
            tracing,
        }
    }

    /// The header the subject token comes in.
    pub(crate) fn header(&self) -> &HeaderName {
        &self.settings.header
    }

    /// How many subjects' tokens are held now, for `/status`.
    pub(crate) fn subjects_held(&self) -> usize {
        self.subjects().by_key.len()
    }

    /// `max_subjects`.
    pub(crate) fn max_subjects(&self) -> usize {
        self.settings.max_subjects
    }

    fn subjects(&self) -> MutexGuard<'_, Subjects> {
        // Each change is finished before the lock is let go, and nothing in it panics.
        self.subjects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The token for the subject token `headers` carry, taking the subject's header out of
    /// them (it never goes upstream, whatever the answer).
    pub(crate) async fn token_for(&self, headers: &mut HeaderMap) -> Result<Arc<Token>, Refusal> {
        let subject = take_subject(headers, &self.settings)?;
        self.token(subject).await
    }

    /// The token for `subject`: held, from the fleet's cache, or exchanged now.
    pub(crate) async fn token(&self, subject: Secret) -> Result<Arc<Token>, Refusal> {
        let key = SubjectKey::of(&subject);
        // A subject seen before has its expiry read already: the JWT is decoded once.
        let slot = match self.find(key) {
            Some(slot) => slot,
            None => {
                let expires = jwt_expiry(subject.expose());
                if expires.is_some_and(|exp| exp <= SystemTime::now()) {
                    return Err(expired());
                }
                self.insert(key, subject, expires)
            }
        };
        let now = Instant::now();
        if let Some(token) = slot.usable(now) {
            return Ok(token);
        }
        if slot.expires.is_some_and(|exp| exp <= SystemTime::now()) {
            self.forget(&slot);
            return Err(expired());
        }
        // The endpoint failed for this subject moments ago: not again before it said.
        if let Some(failure) = slot.backing_off(now) {
            return Err(failure);
        }
        self.fetch(&slot, None).await
    }

    /// The slot of `key`, if the subject is held, marked as just used.
    fn find(&self, key: SubjectKey) -> Option<Arc<Slot>> {
        self.subjects().touch(key)
    }

    /// The slot of a subject not held a moment ago (another request may have made it since),
    /// evicting the least recently used subject when `max_subjects` are held.
    fn insert(&self, key: SubjectKey, subject: Secret, expires: Option<SystemTime>) -> Arc<Slot> {
        let mut subjects = self.subjects();
        if let Some(slot) = subjects.touch(key) {
            return slot;
        }
        subjects.uses += 1;
        let now = subjects.uses;
        while subjects.by_key.len() >= self.settings.max_subjects {
            let Some((_, oldest)) = subjects.by_use.pop_first() else {
                break;
            };
            subjects.by_key.remove(&oldest);
        }
        let slot = Arc::new(Slot {
            key,
            subject,
            expires,
            flight: tokio::sync::Mutex::new(()),
            state: Mutex::new(SlotState::default()),
        });
        subjects.by_key.insert(
            key,
            Held {
                slot: Arc::clone(&slot),
                used: now,
            },
        );
        subjects.by_use.insert(now, key);
        let count = subjects.by_key.len();
        drop(subjects);
        self.count_subjects(count);
        slot
    }

    /// Forgets `slot`'s subject, unless another slot has taken its place since.
    fn forget(&self, slot: &Arc<Slot>) {
        let mut subjects = self.subjects();
        let same = subjects
            .by_key
            .get(&slot.key)
            .is_some_and(|held| Arc::ptr_eq(&held.slot, slot));
        if !same {
            return;
        }
        if let Some(held) = subjects.by_key.remove(&slot.key) {
            subjects.by_use.remove(&held.used);
        }
        let count = subjects.by_key.len();
        drop(subjects);
        self.count_subjects(count);
    }

    fn count_subjects(&self, count: usize) {
        if let Ok(observers) = self.observers.read() {
            for metrics in &observers.metrics {
                metrics.subjects_held(count);
            }
        }
    }

    /// Fetches the subject's token, one flight at a time: a request that waited for another
    /// fetch takes its outcome. `rejected`: the token an upstream just refused, which is not
    /// taken back, and whose copy in the cache is deleted.
    async fn fetch(
        &self,
        slot: &Arc<Slot>,
        rejected: Option<&Token>,
    ) -> Result<Arc<Token>, Refusal> {
        let seen = slot.state().flights;
        let _flight = slot.flight.lock().await;
        let refused = {
            let state = slot.state();
            if let Some(token) = state.token.as_ref().filter(|t| {
                t.is_usable_at(Instant::now())
                    && rejected.map_or(true, |r| t.generation > r.generation)
            }) {
                return Ok(Arc::clone(token));
            }
            if state.flights > seen {
                if let Some(failure) = &state.failure {
                    return Err(failure.clone());
                }
            }
            state.refused.clone()
        };
        if let (Some(cache), Some(rejected)) = (&self.cache, rejected) {
            cache.delete(&slot.key, rejected).await;
        }
        if let Some(cache) = &self.cache {
            if let Some(token) = cache.get(&slot.key, refused.as_deref()).await {
                let token = self.publish(slot, token);
                audit::acquired(&self.label(), &self.audit(slot), &token, true);
                return Ok(token);
            }
        }
        let started = Instant::now();
        let span = self.tracing.as_ref().map(FetchTracing::start);
        let outcome = self.fetcher.fetch_for(&slot.subject).await;
        if let Some(span) = span {
            let label = match &outcome {
                Ok(_) => "success",
                Err(error) => error
                    .outcome()
                    .map_or("secret_error", super::metrics::FetchOutcome::label),
            };
            let status = outcome
                .as_ref()
                .err()
                .and_then(FetchError::endpoint)
                .map(|e| e.status);
            let fetch = telemetry::fetch_ended(span, label, status, false);
            // The request that made the exchange links to it, as waiters on a source's
            // refresher do.
            telemetry::link_to_fetch(&fetch);
        }
        self.record(slot, outcome, started.elapsed()).await
    }

    /// The subject's token as it is kept: bounded by the subject's expiry, numbered, and
    /// published to the requests that wait for it.
    fn publish(&self, slot: &Slot, mut token: Token) -> Arc<Token> {
        if let Some(expires) = slot.expires {
            bound(&mut token, expires);
        }
        token.subject = Some(slot.key);
        let mut state = slot.state();
        state.generations += 1;
        state.flights += 1;
        token.generation = state.generations;
        let token = Arc::new(token);
        state.token = Some(Arc::clone(&token));
        state.failure = None;
        state.backing_off = None;
        token
    }

    /// Counts, logs and audits a fetch, and makes of its outcome the subject's token or the
    /// request's refusal.
    async fn record(
        &self,
        slot: &Arc<Slot>,
        outcome: Result<Token, FetchError>,
        elapsed: Duration,
    ) -> Result<Arc<Token>, Refusal> {
        let fetch_outcome = match &outcome {
            Ok(_) => Some(super::metrics::FetchOutcome::Success),
            Err(error) => error.outcome(),
        };
        if let Ok(observers) = self.observers.read() {
            for metrics in &observers.metrics {
                metrics.fetch_finished(fetch_outcome, elapsed);
            }
        }
        let label = self.label();
        let subject_hash = slot.key.fingerprint();
        match outcome {
            Ok(token) => {
                let token = self.publish(slot, token);
                tracing::info!(
                    upstream = %label,
                    subject_hash = subject_hash.as_str(),
                    outcome = "success",
                    duration_ms = elapsed.as_millis() as u64,
                    expires_in = token.lifetime.as_secs(),
                    lifetime_from = %token.lifetime_source,
                    "token exchanged on behalf of a subject"
                );
                audit::acquired(&label, &self.audit(slot), &token, false);
                if let Some(cache) = &self.cache {
                    cache.put(&slot.key, &token).await;
                }
                Ok(token)
            }
            Err(error) => {
                audit::failed(&label, &self.audit(slot), &error);
                let endpoint = error.endpoint();
                tracing::warn!(
                    upstream = %label,
                    subject_hash = subject_hash.as_str(),
                    outcome = fetch_outcome.map_or("secret_error", super::metrics::FetchOutcome::label),
                    duration_ms = elapsed.as_millis() as u64,
                    status = endpoint.map(|e| e.status.as_u16()),
                    endpoint_error = endpoint.and_then(|e| e.error.as_deref()),
                    error = %error,
                    "token exchange on behalf of a subject failed"
                );
                let (refusal, backing_off) = if is_about_the_subject(&error) {
                    // Nothing is kept of a subject the endpoint refused.
                    self.forget(slot);
                    let refusal = Refusal::Rejected(format!(
                        "the token endpoint refused to exchange the subject token ({})",
                        error.summary()
                    ));
                    (refusal, None)
                } else {
                    let retry_after = error
                        .retry_after()
                        .unwrap_or(FAILURE_BACKOFF)
                        .clamp(FAILURE_BACKOFF, MAX_FAILURE_BACKOFF);
                    let refusal = Refusal::Unavailable(Unavailable {
                        detail: error.summary(),
                        retry_after,
                    });
                    (refusal, Instant::now().checked_add(retry_after))
                };
                let mut state = slot.state();
                state.flights += 1;
                state.failure = Some(refusal.clone());
                state.backing_off = backing_off;
                Err(refusal)
            }
        }
    }

    /// A new token for the subject of `rejected`, which an upstream has just answered 401 to:
    /// the subject's token is dropped (here and in the cache) and exchanged again, once
    /// however many requests report it, and at most once per [`REJECTION_REFETCH_INTERVAL`].
    /// `Err` when that cannot be: the caller passes the upstream's 401 on.
    pub(crate) async fn replacement_for(
        &self,
        rejected: &Token,
    ) -> Result<Arc<Token>, Unavailable> {
        let no = |detail: &str| Unavailable {
            detail: detail.to_owned(),
            retry_after: Duration::from_secs(1),
        };
        let slot = self
            .drop_rejected(rejected)
            .ok_or_else(|| no("the subject is no longer held"))?;
        {
            let mut state = slot.state();
            let now = Instant::now();
            if let Some(newer) = state
                .token
                .as_ref()
                .filter(|t| t.generation > rejected.generation && t.is_usable_at(now))
            {
                return Ok(Arc::clone(newer));
            }
            let recent = state
                .rejection_fetch
                .is_some_and(|last| now < last + REJECTION_REFETCH_INTERVAL);
            if !recent {
                state.rejection_fetch = Some(now);
            } else if slot.flight.try_lock().is_ok() {
                // No exchange under way to wait for: the upstream's 401 goes to the app.
                return Err(no("the subject's token was exchanged again moments ago"));
            }
            // Else another report's exchange is under way: its outcome is this one's too.
        }
        self.fetch(&slot, Some(rejected))
            .await
            .map_err(|refusal| match refusal {
                Refusal::Unavailable(unavailable) => unavailable,
                Refusal::Missing(detail) => no(detail),
                Refusal::Rejected(detail) => no(&detail),
            })
    }

    /// Reports that an upstream answered 401 to `rejected`, without waiting for a new token:
    /// the subject's next request exchanges its token again.
    pub(crate) fn reject(&self, rejected: &Token) {
        let _ = self.drop_rejected(rejected);
    }

    /// Drops the subject's token if it is still `rejected` (auditing it once), and returns the
    /// subject's slot, if it is still held.
    fn drop_rejected(&self, rejected: &Token) -> Option<Arc<Slot>> {
        let key = rejected.subject?;
        let slot = self
            .subjects()
            .by_key
            .get(&key)
            .map(|held| Arc::clone(&held.slot))?;
        let dropped = {
            let mut state = slot.state();
            let holds = state
                .token
                .as_ref()
                .is_some_and(|t| t.generation == rejected.generation);
            if holds {
                state.token = None;
                state.refused = Some(crate::jose::sha256_base64url(
                    rejected.access_token().0.as_bytes(),
                ));
            }
            holds
        };
        if dropped {
            tracing::info!(
                upstream = %self.label(),
                subject_hash = slot.key.fingerprint().as_str(),
                "upstream rejected a subject's token: it is exchanged again"
            );
            audit::rejected_by_upstream(&self.label(), &self.audit(&slot), rejected, true);
        }
        Some(slot)
    }

    /// The upstreams the source serves, for logs.
    fn label(&self) -> String {
        self.observers
            .read()
            .map(|o| o.label.clone())
            .unwrap_or_default()
    }

    /// What the audit events of `slot`'s fetches say: the source's description and the
    /// subject's hash.
    fn audit(&self, slot: &Slot) -> audit::Describe {
        let mut about = self
            .observers
            .read()
            .map(|o| o.audit.clone())
            .unwrap_or_default();
        about.subject_hash = Some(slot.key.fingerprint());
        about
    }
}

/// The refusal of a subject whose JWT `exp` is past.
fn expired() -> Refusal {
    Refusal::Rejected(
        "the subject token has expired (its JWT exp claim is past): not sent to the token endpoint"
            .into(),
    )
}

/// Whether the token endpoint's refusal is about the subject (RFC 8693 §2.2.2: `invalid_request`,
/// or `invalid_grant` for a subject token that is invalid or expired; `invalid_target`), rather
/// than about bearerd's client or a limit: a 401 or `invalid_client` is the client's
/// authentication (RFC 6749 §5.2), `unauthorized_client`, `unsupported_grant_type` and
/// `invalid_scope` its configuration, a 429 a limit. Those are 503s, as for any source.
fn is_about_the_subject(error: &FetchError) -> bool {
    let FetchError::Rejected { error, .. } = error else {
        return false;
    };
    let about_the_client = matches!(
        error.error.as_deref(),
        Some("invalid_client" | "unauthorized_client" | "unsupported_grant_type" | "invalid_scope")
    );
    !about_the_client
        && error.status != http::StatusCode::UNAUTHORIZED
        && error.status != http::StatusCode::TOO_MANY_REQUESTS
}

/// Takes the subject token out of `headers`: the header is removed whatever it holds. With
/// `Authorization`, only a `Bearer` credential (the scheme in any case, RFC 9110 §11.1) is a
/// subject token, and the scheme is not part of it.
fn take_subject(headers: &mut HeaderMap, settings: &OnBehalfOf) -> Result<Secret, Refusal> {
    let name = &settings.header;
    let mut values = headers.get_all(name).iter();
    let once = match (values.next(), values.next()) {
        (None, _) => Err(Refusal::Missing("the request carries no subject token")),
        (Some(_), Some(_)) => Err(Refusal::Missing(
            "the request carries its subject token header more than once",
        )),
        (Some(_), None) => Ok(()),
    };
    let value = headers.remove(name);
    once?;
    let Some(value) = value else {
        return Err(Refusal::Missing("the request carries no subject token"));
    };
    let text = value
        .to_str()
        .map_err(|_| Refusal::Missing("the subject token header is not visible ASCII"))?;
    let token = if settings.is_authorization() {
        match text.trim().split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token,
            _ => {
                return Err(Refusal::Missing(
                    "Authorization does not hold a Bearer token, the subject token",
                ))
            }
        }
    } else {
        text
    };
    let token = token.trim();
    if token.is_empty() {
        return Err(Refusal::Missing("the subject token header is empty"));
    }
    Ok(Secret::new(token))
}

/// The `exp` of a JWT (a JWS in compact form), without verifying it: only to bound how long
/// its exchange is used. `None` for anything else, or a JWT without `exp`.
fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    // A payload larger than any token endpoint would take is not decoded.
    if payload.len() > 16 * 1024 {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_f64()?;
    if !exp.is_finite() || exp < 0.0 {
        return None;
    }
    // `as` saturates: an `exp` beyond any clock bounds nothing.
    UNIX_EPOCH.checked_add(Duration::from_secs(exp as u64))
}

/// Bounds `token` by `expires`, the subject's expiry: it is not used, nor kept in the cache,
/// past it. Its lifetime is cut as much, so that when it was obtained (expiry less lifetime)
/// stays true in audit events and `/status`.
fn bound(token: &mut Token, expires: SystemTime) {
    let Ok(cut) = token.expires_at.duration_since(expires) else {
        return;
    };
    if cut.is_zero() {
        return;
    }
    let left = expires
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    if let Some(until) = Instant::now().checked_add(left) {
        token.usable_until = token.usable_until.min(until);
    }
    token.expires_at = expires;
    token.lifetime = token.lifetime.saturating_sub(cut);
    token.lifetime_source = super::LifetimeSource::SubjectExpiry;
}

#[cfg(test)]
mod tests;
