//! Secrets: the client secret and where it comes from.
//!
//! A [`Secret`] never prints its value: `Debug` shows `[redacted]`, there is no `Display`,
//! and the only way to the value is [`Secret::expose`], so every use is easy to find.

use std::fmt;
use std::path::PathBuf;

/// A value that must never reach a log line, an error body or `Debug` output.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(Box<str>);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into().into_boxed_str())
    }

    /// The value itself. Call only where it is sent to the party that owns it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Where a client secret is read from.
///
/// It is read again for every token request, so a rotated Kubernetes Secret (a mounted file
/// that the kubelet swaps) takes effect without a restart.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SecretSource {
    /// `client_secret_file`: the whole file, minus trailing line breaks.
    File(PathBuf),
    /// `client_secret_env`: an environment variable of the bearerd process.
    Env(String),
    /// `client_secret`: written in the config itself (for development only).
    Inline(Secret),
}

impl SecretSource {
    /// Reads the secret now.
    ///
    /// The read is a small synchronous one: a mounted Secret is a tmpfs file of a few bytes,
    /// read once per token request, so it is not worth a trip through a blocking pool.
    pub fn read(&self) -> Result<Secret, SecretError> {
        let value = match self {
            Self::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| SecretError::File {
                    path: path.clone(),
                    source,
                })?;
                // `echo secret > file` and most editors end the file with a line break that
                // is not part of the secret.
                text.trim_end_matches(['\n', '\r']).to_owned()
            }
            Self::Env(name) => std::env::var(name).map_err(|cause| match cause {
                std::env::VarError::NotPresent => SecretError::EnvMissing { name: name.clone() },
                std::env::VarError::NotUnicode(_) => {
                    SecretError::EnvNotUnicode { name: name.clone() }
                }
            })?,
            Self::Inline(secret) => return Ok(secret.clone()),
        };
        if value.is_empty() {
            return Err(SecretError::Empty {
                origin: self.to_string(),
            });
        }
        Ok(Secret::new(value))
    }
}

/// Names the source, never the value.
impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::Env(name) => write!(f, "environment variable {name}"),
            Self::Inline(_) => f.write_str("client_secret in the config"),
        }
    }
}

/// A client secret that could not be read. Each variant names the source.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file is missing or unreadable.
    #[error("cannot read client secret file {}: {source}", path.display())]
    File {
        /// The configured path.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The variable is not set in bearerd's environment.
    #[error("client secret environment variable {name} is not set")]
    EnvMissing {
        /// The variable's name.
        name: String,
    },
    /// The variable holds bytes that are not UTF-8.
    #[error("client secret environment variable {name} is not valid UTF-8")]
    EnvNotUnicode {
        /// The variable's name.
        name: String,
    },
    /// The source exists but holds nothing.
    #[error("client secret from {origin} is empty")]
    Empty {
        /// The source, as [`SecretSource`] displays it.
        origin: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "Secret([redacted])");
        let source = SecretSource::Inline(secret);
        assert!(!format!("{source:?} {source}").contains("hunter2"));
    }

    #[test]
    fn file_is_read_each_time_without_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "first\n").unwrap();
        let source = SecretSource::File(path.clone());
        assert_eq!(source.read().unwrap().expose(), "first");
        std::fs::write(&path, "second\r\n").unwrap();
        assert_eq!(source.read().unwrap().expose(), "second");
    }

    #[test]
    fn errors_name_the_source() {
        let missing = SecretSource::File("/nonexistent/bearerd/secret".into());
        let message = missing.read().unwrap_err().to_string();
        assert!(message.contains("/nonexistent/bearerd/secret"), "{message}");

        let unset = SecretSource::Env("BEARERD_TEST_SURELY_UNSET_VARIABLE".into());
        let message = unset.read().unwrap_err().to_string();
        assert!(
            message.contains("BEARERD_TEST_SURELY_UNSET_VARIABLE"),
            "{message}"
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty");
        std::fs::write(&path, "\n").unwrap();
        let message = SecretSource::File(path).read().unwrap_err().to_string();
        assert!(message.contains("is empty"), "{message}");
    }
}
