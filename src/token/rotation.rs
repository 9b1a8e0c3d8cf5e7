//! `grant = "refresh_token"`: the chain of refresh tokens a source spends, one per fetch.
//!
//! Servers that rotate refresh tokens (RFC 6749 §6, OAuth 2.1 §4.3.1) invalidate each one
//! when it is used and return the next; losing the newest means a person must authorise
//! again. So the chain is kept in the `[cache]` (sealed) and the cache wrapper
//! (`cache::CachedFetch`) loads it before each fetch and stores the next one before the new
//! access token is handed out, under the fleet lease with Redis. This object is what the
//! fetcher and that wrapper share: the token to spend, where the chain began (a fingerprint
//! of `refresh_token_file`, so that a file written since wins), whether the newest is not yet
//! stored, and whether the server said the authorisation is lost.

use std::sync::Mutex;

use super::client_auth::CredentialError;
use super::fetch::FetchError;
use super::grant;
use crate::config::{Grant, TokenSettings};
use crate::jose::sha256_base64url;
use crate::secret::Secret;

/// The refresh token chain of one source.
#[derive(Default)]
pub(crate) struct RefreshChain {
    state: Mutex<Chain>,
}

#[derive(Default)]
struct Chain {
    /// The refresh token the next fetch spends.
    held: Option<Secret>,
    /// The fingerprint of `refresh_token_file` when the chain began.
    origin: Option<String>,
    /// The server sent `held` and it is not stored yet (kept in memory, stored again).
    unsaved: bool,
    /// Why the last store failed, while `unsaved`: `/readyz` shows it.
    store_error: Option<String>,
    /// The fingerprint of the refresh token the server answered `invalid_grant` to.
    lost: Option<String>,
}

/// A refresh token file's contents and their fingerprint.
pub(crate) struct FileToken {
    pub(crate) token: Secret,
    pub(crate) origin: String,
}

impl FileToken {
    /// Reads `refresh_token_file` now.
    pub(crate) async fn read(
        settings: &TokenSettings,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Self>, CredentialError> {
        let Grant::RefreshToken(refresh) = &settings.grant else {
            return Ok(None);
        };
        let token = grant::token_file(&refresh.file, deadline).await?;
        let origin = fingerprint(&token);
        Ok(Some(Self { token, origin }))
    }
}

/// A refresh token's fingerprint: never the token.
fn fingerprint(token: &Secret) -> String {
    sha256_base64url(token.expose().as_bytes())
}

impl RefreshChain {
    fn lock(&self) -> std::sync::MutexGuard<'_, Chain> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The refresh token to spend now; `None` for a grant that spends none. Without a cache
    /// wrapper in front (which loads the chain first), the file's token begins it. A token the
    /// server said is lost is not spent again.
    pub(crate) async fn current(
        &self,
        settings: &TokenSettings,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Secret>, FetchError> {
        if !matches!(settings.grant, Grant::RefreshToken(_)) {
            return Ok(None);
        }
        let held = self.lock().held.clone();
        let held = match held {
            Some(held) => held,
            None => {
                let Some(file) = FileToken::read(settings, deadline).await? else {
                    return Ok(None);
                };
                self.begin(file.token.clone(), file.origin);
                file.token
            }
        };
        if self.lock().lost.as_deref() == Some(fingerprint(&held).as_str()) {
            return Err(FetchError::AuthorisationLost {
                endpoint: None,
                reason: "the token endpoint answered invalid_grant to this refresh token before, and refresh_token_file has not changed since".into(),
            });
        }
        Ok(Some(held))
    }

    /// Loads the chain before a fetch: the memory's token when it is newer than the store's
    /// (not stored yet) and of the same file; else the stored one when its chain began from
    /// the file as it is now; else the memory's of that file (the store has none); else the
    /// file's (a new authorisation, or the first start).
    pub(crate) fn load(&self, file: FileToken, stored: Option<(Secret, String)>) {
        let mut chain = self.lock();
        if chain.unsaved && chain.origin.as_deref() == Some(file.origin.as_str()) {
            return;
        }
        match stored {
            Some((token, origin)) if origin == file.origin => {
                chain.held = Some(token);
                chain.origin = Some(origin);
            }
            // Nothing stored of this chain (the store lost it, or this process never stored
            // one): the token this process holds of it is newer than the file's.
            _ if chain.held.is_some() && chain.origin.as_deref() == Some(file.origin.as_str()) => {}
            _ => {
                chain.held = Some(file.token);
                chain.origin = Some(file.origin);
            }
        }
        chain.unsaved = false;
        chain.store_error = None;
    }

    /// Whether the chain held began from the file whose fingerprint is `origin`.
    pub(crate) fn is_of(&self, origin: &str) -> bool {
        let chain = self.lock();
        chain.held.is_some() && chain.origin.as_deref() == Some(origin)
    }

    fn begin(&self, token: Secret, origin: String) {
        let mut chain = self.lock();
        chain.held = Some(token);
        chain.origin = Some(origin);
    }

    /// The server sent `new`: the next fetch spends it, and it is not stored yet.
    pub(crate) fn rotate(&self, settings: &TokenSettings, new: &Secret) {
        if matches!(settings.grant, Grant::RefreshToken(_)) {
            let mut chain = self.lock();
            if chain.held.as_ref() != Some(new) {
                chain.held = Some(new.clone());
                chain.unsaved = true;
            }
        }
    }

    /// The server answered `invalid_grant` to the token held.
    pub(crate) fn lose(&self) {
        let mut chain = self.lock();
        chain.lost = chain.held.as_ref().map(fingerprint);
    }

    /// The newest token and its origin, when it is not stored yet.
    pub(crate) fn unsaved(&self) -> Option<(Secret, String)> {
        let chain = self.lock();
        match (&chain.held, &chain.origin) {
            (Some(held), Some(origin)) if chain.unsaved => Some((held.clone(), origin.clone())),
            _ => None,
        }
    }

    /// How storing `token` went: stored, or why not (it stays in memory, and is stored again
    /// before the next fetch).
    pub(crate) fn stored(&self, token: &Secret, outcome: Result<(), String>) {
        let mut chain = self.lock();
        if chain.held.as_ref() != Some(token) {
            return;
        }
        match outcome {
            Ok(()) => {
                chain.unsaved = false;
                chain.store_error = None;
            }
            Err(error) => chain.store_error = Some(error),
        }
    }

    /// What `/readyz` says of the chain beside a usable token: the newest refresh token is
    /// held in memory only, or the authorisation is lost.
    pub(crate) fn warning(&self) -> Option<String> {
        let chain = self.lock();
        if chain.lost.is_some() && chain.lost == chain.held.as_ref().map(fingerprint) {
            return Some("authorisation lost: the token endpoint answered invalid_grant to the refresh token; a person must authorise again and write the new refresh token to refresh_token_file".into());
        }
        chain.store_error.as_ref().map(|error| {
            format!("the new refresh token is held in memory only (storing it failed: {error}); a restart now would lose it")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(token: &str) -> FileToken {
        let token = Secret::new(token);
        FileToken {
            origin: fingerprint(&token),
            token,
        }
    }

    fn held(chain: &RefreshChain) -> String {
        chain.lock().held.as_ref().unwrap().expose().to_owned()
    }

    fn settings() -> TokenSettings {
        TokenSettings {
            grant: Grant::RefreshToken(crate::config::RefreshToken {
                file: "/nonexistent".into(),
            }),
            ..TokenSettings::for_tests(crate::config::ClientAuth::None)
        }
    }

    #[test]
    fn the_stored_token_of_the_files_chain_wins_over_the_file() {
        let chain = RefreshChain::default();
        let origin = file("rt-0").origin;
        chain.load(file("rt-0"), Some((Secret::new("rt-5"), origin)));
        assert_eq!(held(&chain), "rt-5");
    }

    #[test]
    fn a_file_written_since_the_chain_began_wins_over_the_store() {
        let chain = RefreshChain::default();
        let old = file("rt-0").origin;
        chain.load(file("rt-new"), Some((Secret::new("rt-5"), old)));
        assert_eq!(held(&chain), "rt-new");
    }

    #[test]
    fn an_unsaved_token_wins_over_a_stale_store_and_is_stored_once() {
        let chain = RefreshChain::default();
        let origin = file("rt-0").origin;
        chain.load(file("rt-0"), None);
        chain.rotate(&settings(), &Secret::new("rt-1"));
        let (unsaved, _) = chain.unsaved().unwrap();
        chain.stored(&unsaved, Err("disk full".into()));
        assert!(chain.warning().unwrap().contains("held in memory only"));
        // The store still has rt-0's chain at rt-0: memory is newer.
        chain.load(file("rt-0"), Some((Secret::new("rt-0"), origin)));
        assert_eq!(held(&chain), "rt-1");
        chain.stored(&unsaved, Ok(()));
        assert!(chain.unsaved().is_none());
        assert!(chain.warning().is_none());
        // Stored since, and nothing in the store (it was lost): memory, not the file.
        chain.load(file("rt-0"), None);
        assert_eq!(held(&chain), "rt-1");
    }

    #[test]
    fn a_lost_authorisation_is_not_spent_again_until_the_file_changes() {
        let chain = RefreshChain::default();
        chain.load(file("rt-0"), None);
        chain.lose();
        assert!(chain.warning().unwrap().starts_with("authorisation lost"));
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let again = runtime.block_on(chain.current(&settings(), deadline));
        assert!(matches!(
            again,
            Err(FetchError::AuthorisationLost { endpoint: None, .. })
        ));
        chain.load(file("rt-reauthorised"), None);
        assert!(chain.warning().is_none());
        let spent = runtime
            .block_on(chain.current(&settings(), deadline))
            .unwrap();
        assert_eq!(spent.unwrap().expose(), "rt-reauthorised");
    }
}
