//! Why a token request failed, classified by whose fault it is, and what of it the app may see.

use std::time::Duration;

use crate::errors;
use crate::secret::SecretError;
use crate::token::client_auth::CredentialError;
use crate::token::metrics::FetchOutcome;
use crate::token::response::{self, EndpointError};

/// Why a token request failed. Messages name statuses, error codes, hosts and sources, never a
/// secret or a token; what the endpoint said is in them only after redaction.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// bearerd could not read the client secret; no request was sent.
    #[error("{0}")]
    Secret(#[from] SecretError),
    /// bearerd could not read or use the client's other credentials (a private key, an
    /// assertion file); no request was sent.
    #[error("{reason}")]
    Credentials {
        /// Why, naming the file.
        reason: String,
    },
    /// bearerd could not build its own request (a credential unfit for a header, say); no
    /// request was sent, and the endpoint is not to blame.
    #[error("cannot build the token request: {reason}")]
    BuildRequest {
        /// Why, in bearerd's words.
        reason: String,
    },
    /// No complete answer within the token timeout.
    #[error("token request to {endpoint} timed out after {}", humantime::format_duration(*.after))]
    Timeout {
        /// The token endpoint's authority.
        endpoint: String,
        /// The timeout that passed.
        after: Duration,
    },
    /// Connecting, the TLS handshake, or the exchange itself failed.
    #[error("cannot reach the token endpoint {endpoint}: {}", errors::chain(.source.as_ref()))]
    Connect {
        /// The token endpoint's authority.
        endpoint: String,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The endpoint refused (4xx): wrong credentials, audience, scope, or too many requests.
    #[error("token endpoint {endpoint} rejected the request: {error}")]
    Rejected {
        /// The token endpoint's authority.
        endpoint: String,
        /// What it answered, redacted.
        error: EndpointError,
        /// The wait it asked for with `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// The endpoint failed (5xx).
    #[error("token endpoint {endpoint} failed: {error}")]
    ServerError {
        /// The token endpoint's authority.
        endpoint: String,
        /// What it answered, redacted.
        error: EndpointError,
        /// The wait it asked for with `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// `grant = "refresh_token"`: the endpoint answered `invalid_grant` to the refresh token
    /// (revoked, expired, or spent elsewhere), or did so before and the chain has not begun
    /// again since. Only a person can mend it: the request is not sent again until
    /// `refresh_token_file` changes.
    #[error("authorisation lost: {reason}; a person must authorise again and write the new refresh token to refresh_token_file")]
    AuthorisationLost {
        /// The token endpoint's authority, when this request was the one refused.
        endpoint: Option<String>,
        /// What happened, in bearerd's words.
        reason: String,
    },
    /// A 2xx answer that holds no usable token, or an answer of another kind.
    #[error("token endpoint {endpoint} sent an unusable response: {problem}")]
    InvalidResponse {
        /// The token endpoint's authority.
        endpoint: String,
        /// What is wrong with it.
        problem: response::InvalidResponse,
    },
}

impl From<CredentialError> for FetchError {
    fn from(error: CredentialError) -> Self {
        match error {
            CredentialError::Secret(error) => Self::Secret(error),
            CredentialError::Unusable(reason) => Self::Credentials { reason },
            CredentialError::Build(reason) => Self::BuildRequest { reason },
        }
    }
}

impl FetchError {
    /// How the request ended, for `bearerd_token_fetch_total`; `None` when none was sent (the
    /// credentials could not be read or used, or bearerd could not build its request).
    pub fn outcome(&self) -> Option<FetchOutcome> {
        match self {
            Self::Secret(_) | Self::Credentials { .. } | Self::BuildRequest { .. } => None,
            Self::Timeout { .. } => Some(FetchOutcome::Timeout),
            Self::Connect { .. } => Some(FetchOutcome::ConnectError),
            Self::Rejected { .. } => Some(FetchOutcome::Rejected),
            Self::ServerError { .. } => Some(FetchOutcome::ServerError),
            Self::InvalidResponse { .. } => Some(FetchOutcome::InvalidResponse),
            Self::AuthorisationLost { endpoint, .. } => {
                endpoint.as_ref().map(|_| FetchOutcome::AuthorisationLost)
            }
        }
    }

    /// What the endpoint answered, when it answered with an error status.
    pub fn endpoint(&self) -> Option<&EndpointError> {
        match self {
            Self::Rejected { error, .. } | Self::ServerError { error, .. } => Some(error),
            _ => None,
        }
    }

    /// The wait the endpoint asked for with `Retry-After` (on 429 and 503).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Rejected { retry_after, .. } | Self::ServerError { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// The failure as the app (in a 503 body) and `/readyz` are told it: the endpoint's host,
    /// the status and a well-formed `error` code, and bearerd's own words; never text the
    /// endpoint chose beyond that code. The log gets the whole [`Display`](std::fmt::Display).
    pub fn summary(&self) -> String {
        match self {
            Self::Rejected {
                endpoint, error, ..
            } => format!(
                "token endpoint {endpoint} rejected the request: {}",
                status_and_code(error)
            ),
            Self::ServerError {
                endpoint, error, ..
            } => format!(
                "token endpoint {endpoint} failed: {}",
                status_and_code(error)
            ),
            Self::InvalidResponse { endpoint, problem } => format!(
                "token endpoint {endpoint} sent an unusable response: {}",
                problem.reason
            ),
            Self::Secret(_)
            | Self::Credentials { .. }
            | Self::BuildRequest { .. }
            | Self::Timeout { .. }
            | Self::Connect { .. }
            | Self::AuthorisationLost { .. } => self.to_string(),
        }
    }
}

/// `status 401 Unauthorized, error "invalid_client"`: the part of an endpoint's error the app
/// may see.
fn status_and_code(error: &EndpointError) -> String {
    match error.code() {
        Some(code) => format!("status {}, error {code:?}", error.status),
        None => format!("status {}", error.status),
    }
}
