//! What authorizes a route's requests: its source's token and, when the source binds tokens
//! to a DPoP key, the proof each request carries (RFC 9449 §7). One object per route, so that
//! the proxy asks one thing for a request's authorization, whatever the scheme.
//!
//! The key belongs to the token source (its tokens are bound to it); the nonce belongs to the
//! route's upstream (each server hands out its own, RFC 9449 §9), and so does the count of
//! requests sent again for a new nonce.

use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, Method};
use prometheus::IntCounter;

use super::dpop::{self, DpopKey, Nonce, DPOP};
use super::metrics::TokenSeries;
use super::on_behalf::OnBehalf;
use super::source::{Handle, Unavailable};
use super::Token;
use crate::config::Presentation;
use crate::jose::SignError;

/// A route's credential: the token to send and, with DPoP, the proof that goes with it.
pub(crate) struct Credential {
    token: Handle,
    /// On-behalf-of: the token comes from the subject each request carries, not from `token`.
    on_behalf: Option<Arc<OnBehalf>>,
    proof: Option<Proof>,
    /// `header` and `prefix`, when not `Authorization: Bearer` (never with DPoP).
    presentation: Option<Presentation>,
}

/// What a route's DPoP proofs need.
struct Proof {
    /// The token source's key.
    key: Arc<DpopKey>,
    /// The upstream's latest nonce.
    nonce: Nonce,
    /// Counts requests sent again with the upstream's new nonce.
    retries: IntCounter,
}

impl Credential {
    /// The credential of a route that reads `token`, bound to `dpop` when its source binds
    /// tokens, counting its nonce retries in `series`.
    pub(crate) fn new(
        token: Handle,
        dpop: Option<Arc<DpopKey>>,
        presentation: &Presentation,
        series: &TokenSeries,
    ) -> Self {
        Self {
            on_behalf: token.on_behalf().cloned(),
            token,
            presentation: (!presentation.is_default()).then(|| presentation.clone()),
            proof: dpop.map(|key| Proof {
                key,
                nonce: Nonce::default(),
                retries: series.upstream_nonce_retries(),
            }),
        }
    }

    /// A usable token: at once when one is held, else after the fetch under way. Not for an
    /// on-behalf-of route, whose requests ask [`Self::on_behalf`] with their subject.
    pub(crate) async fn token(&self) -> Result<Arc<Token>, Unavailable> {
        self.token.token().await
    }

    /// On-behalf-of: where a request's token comes from instead of [`Self::token`]. The proxy
    /// looks once per request, and only a route of such a source pays for more.
    #[inline]
    pub(crate) fn on_behalf(&self) -> Option<&OnBehalf> {
        self.on_behalf.as_deref()
    }

    /// A token newer than `rejected`, which the upstream has just answered 401 to.
    pub(crate) async fn replacement_for(
        &self,
        rejected: &Token,
    ) -> Result<Arc<Token>, Unavailable> {
        match (&self.on_behalf, rejected.subject) {
            // Boxed: an exchange's future is large, and would grow the future of every
            // request (which holds this one), copied at each move (docs/benchmarks.md).
            (Some(on_behalf), Some(_)) => Box::pin(on_behalf.replacement_for(rejected)).await,
            _ => self.token.replacement_for(rejected).await,
        }
    }

    /// Reports that the upstream answered 401 to `rejected`, without waiting for a new token.
    pub(crate) fn reject(&self, rejected: &Token) {
        match (&self.on_behalf, rejected.subject) {
            (Some(on_behalf), Some(_)) => on_behalf.reject(rejected),
            _ => self.token.reject(rejected),
        }
    }

    /// The header the token goes in: the app's own value of it is replaced, and (when it is
    /// not `Authorization`) the app's `Authorization` passes as sent.
    pub(crate) fn header(&self) -> &HeaderName {
        self.presentation
            .as_ref()
            .map_or(&AUTHORIZATION, |p| &p.header)
    }

    /// Authorizes a request with `method` to `htu` (scheme, authority and path, RFC 9449
    /// §4.2; only made when a proof needs it) by `token`: sets the token's header
    /// (`Authorization`, or `header`), replacing whatever the app sent in it, and with DPoP a
    /// fresh `DPoP` proof.
    // Forced inline, as `proxy::forward::authorize_attempt` is: both have two callers (a
    // request and an upgrade's handshake), and whichever is left out of line costs every request
    // a call (callgrind: about +50 instructions per request).
    #[inline(always)]
    pub(crate) fn authorize(
        &self,
        headers: &mut HeaderMap,
        token: &Token,
        method: &Method,
        htu: impl FnOnce() -> String,
    ) -> Result<(), SignError> {
        match &self.presentation {
            None => {
                headers.insert(AUTHORIZATION, token.authorization().clone());
            }
            // Built per request: the prefix is the route's, the token the source's, and the
            // default presentation (nearly every route) costs nothing.
            Some(presentation) => {
                headers.insert(&presentation.header, token.presented(&presentation.prefix));
            }
        }
        if let Some(proof) = &self.proof {
            let value = proof.key.proof(
                method.as_str(),
                &htu(),
                token.proof_hash.as_deref(),
                proof.nonce.get().as_deref(),
            )?;
            headers.insert(DPOP, value);
        }
        Ok(())
    }

    /// Notes what an upstream's answer says for the next proof: any answer may carry the nonce
    /// it must hold (RFC 9449 §9).
    pub(crate) fn observe(&self, answer: &HeaderMap) {
        if let Some(proof) = &self.proof {
            proof.nonce.update(answer);
        }
    }

    /// Whether an upstream's 401 asks for a proof with a (newer) nonce rather than for another
    /// token (RFC 9449 §9).
    pub(crate) fn wants_new_proof(&self, answer: &HeaderMap) -> bool {
        self.proof.is_some() && dpop::asks_for_nonce(answer)
    }

    /// Counts a request sent again for the upstream's new nonce.
    pub(crate) fn count_proof_retry(&self) {
        if let Some(proof) = &self.proof {
            proof.retries.inc();
        }
    }
}
