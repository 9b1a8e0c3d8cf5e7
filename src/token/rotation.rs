//! `grant = "refresh_token"`: the refresh token the next fetch spends. The first comes from
//! `refresh_token_file`; each one the server sends back (RFC 6749 §6 lets it rotate them)
//! replaces it.

use std::sync::Mutex;

use super::client_auth::CredentialError;
use super::grant;
use crate::config::{Grant, TokenSettings};
use crate::secret::Secret;

/// The refresh token of a source's chain, held in memory.
#[derive(Default)]
pub(crate) struct RefreshChain {
    held: Mutex<Option<Secret>>,
}

impl RefreshChain {
    /// The refresh token to spend now; `None` for a grant that spends none.
    pub(crate) async fn current(
        &self,
        settings: &TokenSettings,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Secret>, CredentialError> {
        let Grant::RefreshToken(refresh) = &settings.grant else {
            return Ok(None);
        };
        if let Some(held) = self.lock().clone() {
            return Ok(Some(held));
        }
        let first = grant::token_file(&refresh.file, deadline).await?;
        *self.lock() = Some(first.clone());
        Ok(Some(first))
    }

    /// The server sent `new`: the next fetch spends it.
    pub(crate) fn rotate(&self, settings: &TokenSettings, new: &Secret) {
        if matches!(settings.grant, Grant::RefreshToken(_)) {
            *self.lock() = Some(new.clone());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Secret>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
