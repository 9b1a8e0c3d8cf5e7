//! The validator: walks the raw file ([`super::file`]), collecting every problem with the
//! line and key it concerns, and builds the runtime types of [`crate::config`] from it.
//!
//! This file holds the walk's state (the problems found so far), the serde pass, and the
//! small top-level tables (`[admin]`, `[log]`, `[server]`, `[cache]`). Listeners and routes
//! are checked in `listener.rs`, token settings in `token.rs` and `client_auth.rs`, single
//! values (addresses, URLs, durations, sizes) in `values.rs`; unknown keys are explained by
//! `keys.rs`. Each is a set of functions taking the [`Validator`].

use std::ops::Range;
use std::path::Path;

use toml::Spanned;

use super::file;
use super::keys;
use super::listener::{check_unique, listeners};
use super::sources::Sources;
use super::values::{count, duration, http_url, networks, size, socket_addr};
use super::{
    Admin, Cache, Config, Log, LogFormat, Problem, Server, DEFAULT_ADMIN_LISTEN,
    DEFAULT_ADMIN_MAX_CONNECTIONS, DEFAULT_BODY_IDLE_TIMEOUT, DEFAULT_CACHE_KEY_PREFIX,
    DEFAULT_CACHE_TIMEOUT, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_LOG_LEVEL, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_REPLAY_MEMORY, DEFAULT_SHUTDOWN_GRACE, DEFAULT_UPGRADED_IDLE_TIMEOUT,
    MAX_HTTP2_MAX_CONCURRENT_STREAMS, MAX_MAX_CONNECTIONS, MIN_MAX_HEADER_BYTES,
};
use super::{Telemetry, DEFAULT_SAMPLE_RATIO, DEFAULT_SERVICE_NAME};

/// Walks the raw file, collecting problems as it goes.
pub(super) struct Validator<'a> {
    /// The files read (main and `conf.d`), to turn offsets into files, lines and columns.
    pub(super) sources: &'a Sources,
    /// Relative paths in the file are taken from here.
    pub(super) base_dir: &'a Path,
    /// Every problem found so far.
    pub(super) problems: Vec<Problem>,
    /// The file has a `[cache]` with a `key_file`: rotated refresh tokens can be kept sealed.
    pub(super) sealed_cache: bool,
}

impl Validator<'_> {
    /// The whole file, or `None` when some part could not be built (its problems recorded).
    pub(super) fn file(&mut self, path: &Path) -> Option<Config> {
        let raw = self.deserialize()?;
        let extra_files = self.sources.extra_paths();
        let admin_listen = match raw.admin.as_ref().and_then(|a| a.get_ref().listen.as_ref()) {
            Some(listen) => socket_addr(self, listen, "admin.listen"),
            #[allow(clippy::expect_used)] // a constant that a unit test parses
            None => Some(DEFAULT_ADMIN_LISTEN.parse().expect("valid default")),
        };
        let admin_max_connections = count(
            self,
            raw.admin
                .as_ref()
                .and_then(|a| a.get_ref().max_connections.as_ref()),
            "admin.max_connections",
            DEFAULT_ADMIN_MAX_CONNECTIONS,
            1..=MAX_MAX_CONNECTIONS,
        );
        let admin_allow_from = raw
            .admin
            .as_ref()
            .and_then(|a| a.get_ref().allow_from.as_ref())
            .map(|list| networks(self, list, "admin.allow_from"));
        let admin_status_from = raw
            .admin
            .as_ref()
            .and_then(|a| a.get_ref().status_from.as_ref())
            .map(|list| networks(self, list, "admin.status_from"))
            .unwrap_or_default();
        self.sealed_cache = raw
            .cache
            .as_ref()
            .is_some_and(|c| c.get_ref().key_file.is_some());
        let log = self.log(raw.log.as_ref());
        let server = self.server(raw.server.as_ref());
        let (upstreams, listeners) = listeners(self, &raw);
        check_unique(self, &raw, admin_listen);
        Some(Config {
            path: path.to_owned(),
            extra_files,
            admin: Admin {
                listen: admin_listen?,
                max_connections: admin_max_connections,
                allow_from: admin_allow_from,
                status_from: admin_status_from,
            },
            log,
            server,
            upstreams: upstreams?,
            listeners: listeners?,
            cache: match &raw.cache {
                Some(cache) => Some(self.cache(cache)?),
                None => None,
            },
            telemetry: match &raw.telemetry {
                Some(telemetry) => Some(self.telemetry(telemetry.get_ref())?),
                None => None,
            },
            egress: match &raw.egress {
                Some(egress) => Some(self.egress(egress, &|name| std::env::var(name).ok())?),
                None => None,
            },
        })
    }

    /// `[cache]`: the keys of its backend, and none of the other's.
    fn cache(&mut self, spanned: &Spanned<file::Cache>) -> Option<Cache> {
        let raw = spanned.get_ref();
        let backend = *raw.backend.get_ref();
        let other_backend_keys: &[(&str, Option<Range<usize>>)] = match backend {
            file::CacheBackend::File => &[
                ("url", raw.url.as_ref().map(Spanned::span)),
                (
                    "password_file",
                    raw.password_file.as_ref().map(Spanned::span),
                ),
                ("key_prefix", raw.key_prefix.as_ref().map(Spanned::span)),
                ("timeout", raw.timeout.as_ref().map(Spanned::span)),
            ],
            file::CacheBackend::Redis => &[("dir", raw.dir.as_ref().map(Spanned::span))],
        };
        let name = match backend {
            file::CacheBackend::File => "file",
            file::CacheBackend::Redis => "redis",
        };
        for (key, span) in other_backend_keys {
            if let Some(span) = span {
                self.problem(
                    span.clone(),
                    format!("cache.{key}"),
                    format!("is not used by backend = {name:?}"),
                );
            }
        }
        let missing = |v: &mut Self, key: &str| {
            v.problem(
                spanned.span(),
                format!("cache.{key}"),
                format!("missing: backend = {name:?} needs {key}"),
            );
        };
        match backend {
            file::CacheBackend::File => {
                let Some(dir) = &raw.dir else {
                    missing(self, "dir");
                    return None;
                };
                Some(Cache::File {
                    dir: self.base_dir.join(dir.get_ref()),
                    key_file: raw
                        .key_file
                        .as_ref()
                        .map(|p| self.base_dir.join(p.get_ref())),
                })
            }
            file::CacheBackend::Redis => {
                let url = match &raw.url {
                    Some(url) => {
                        let text = url.get_ref();
                        let scheme_ok =
                            text.starts_with("redis://") || text.starts_with("rediss://");
                        let authority = text.split_once("://").map_or("", |(_, rest)| {
                            rest.split(['/', '?', '#']).next().unwrap_or("")
                        });
                        if !scheme_ok {
                            self.problem(
                                url.span(),
                                "cache.url",
                                format!("{text:?} is not a redis:// or rediss:// URL"),
                            );
                        } else if authority.contains('@') {
                            self.problem(
                                url.span(),
                                "cache.url",
                                "must not hold a user name or password: bearerd would print it; use password_file",
                            );
                        }
                        Some(text.clone())
                    }
                    None => {
                        missing(self, "url");
                        None
                    }
                };
                let key_file = match &raw.key_file {
                    Some(path) => Some(self.base_dir.join(path.get_ref())),
                    None => {
                        self.problem(
                            spanned.span(),
                            "cache.key_file",
                            "missing: a shared Redis holds tokens encrypted; set key_file to a file of 32 random bytes in base64 (openssl rand -base64 32)",
                        );
                        None
                    }
                };
                let timeout = duration(
                    self,
                    raw.timeout.as_ref(),
                    "cache.timeout",
                    DEFAULT_CACHE_TIMEOUT,
                );
                Some(Cache::Redis {
                    url: url?,
                    password_file: raw
                        .password_file
                        .as_ref()
                        .map(|p| self.base_dir.join(p.get_ref())),
                    key_file: key_file?,
                    key_prefix: raw.key_prefix.as_ref().map_or_else(
                        || DEFAULT_CACHE_KEY_PREFIX.to_owned(),
                        |p| p.get_ref().clone(),
                    ),
                    timeout,
                })
            }
        }
    }

    /// `[telemetry]`: the collector's URL (`/v1/traces` appended, OTLP/HTTP), the service
    /// name, and a ratio between 0 and 1.
    fn telemetry(&mut self, raw: &file::Telemetry) -> Option<Telemetry> {
        // Spans hold no secret or token (src/telemetry.rs): plain http to a collector on the
        // network is allowed, as collectors usually listen so.
        let base = http_url(self, &raw.otlp_endpoint, "telemetry.otlp_endpoint", true);
        let traces_url = base.and_then(|base| {
            let text = base.to_string();
            let url = format!("{}/v1/traces", text.trim_end_matches('/'));
            match url.parse::<http::Uri>() {
                Ok(url) if base.query().is_none() => Some(url),
                _ => {
                    self.problem(
                        raw.otlp_endpoint.span(),
                        "telemetry.otlp_endpoint",
                        format!("{text:?} must be a base URL without a query, such as \"http://127.0.0.1:4318\": /v1/traces is appended"),
                    );
                    None
                }
            }
        });
        let service_name = match &raw.service_name {
            Some(name) if name.get_ref().trim().is_empty() => {
                self.problem(name.span(), "telemetry.service_name", "must not be empty");
                None
            }
            Some(name) => Some(name.get_ref().clone()),
            None => Some(DEFAULT_SERVICE_NAME.to_owned()),
        };
        let sample_ratio = match &raw.sample_ratio {
            Some(ratio) if !(0.0..=1.0).contains(ratio.get_ref()) => {
                self.problem(
                    ratio.span(),
                    "telemetry.sample_ratio",
                    format!("{} is not between 0 and 1", ratio.get_ref()),
                );
                None
            }
            Some(ratio) => Some(*ratio.get_ref()),
            None => Some(DEFAULT_SAMPLE_RATIO),
        };
        Some(Telemetry {
            traces_url: traces_url?,
            service_name: service_name?,
            sample_ratio: sample_ratio?,
        })
    }

    /// The files merged ([`Sources::merged`]), then serde's pass: syntax, types, unknown and
    /// missing keys. Serde stops at the first problem.
    fn deserialize(&mut self) -> Option<file::File> {
        let sources = self.sources;
        let mut merge_problems = Vec::new();
        let merged = sources.merged(&mut merge_problems);
        for p in merge_problems {
            let message = match (p.message, p.first) {
                (Some(message), _) => message,
                (None, first) => format!(
                    "is set twice: first at {}; a key is set in one file only (the config file or one file of conf.d/)",
                    sources.place(first.unwrap_or(0))
                ),
            };
            self.problem(p.span, p.key, message);
        }
        let merged = match merged {
            Ok(table) => table,
            Err(p) => {
                self.problem(p.span, p.key, p.message.unwrap_or_default());
                return None;
            }
        };
        let deserializer = toml::Deserializer::from(merged);
        match serde_path_to_error::deserialize::<_, file::File>(deserializer) {
            Ok(file) => Some(file),
            Err(e) => {
                let key = key_path(e.path());
                // serde lists the fields of the struct, which `[[upstream]]` and
                // `[[listener.route]]` share; `keys` says which of them this table takes.
                let unknown = keys::unknown_key(&key_names(e.path()));
                let inner = e.into_inner();
                let message = unknown.unwrap_or_else(|| inner.message().to_owned());
                self.problem(inner.span().unwrap_or(0..0), key, message);
                None
            }
        }
    }

    /// `[server]`, each key its default when not written.
    fn server(&mut self, raw: Option<&file::Server>) -> Server {
        let server_duration =
            |v: &mut Self,
             pick: fn(&file::Server) -> Option<&Spanned<file::DurationText>>,
             key: &str,
             default| { duration(v, raw.and_then(pick), key, default) };
        let shutdown_grace = server_duration(
            self,
            |s| s.shutdown_grace.as_ref(),
            "server.shutdown_grace",
            DEFAULT_SHUTDOWN_GRACE,
        );
        let header_read_timeout = server_duration(
            self,
            |s| s.header_read_timeout.as_ref(),
            "server.header_read_timeout",
            DEFAULT_HEADER_READ_TIMEOUT,
        );
        let idle_timeout = server_duration(
            self,
            |s| s.idle_timeout.as_ref(),
            "server.idle_timeout",
            DEFAULT_IDLE_TIMEOUT,
        );
        let max_header_bytes = count(
            self,
            raw.and_then(|s| s.max_header_bytes.as_ref()),
            "server.max_header_bytes",
            DEFAULT_MAX_HEADER_BYTES,
            MIN_MAX_HEADER_BYTES..=usize::MAX,
        );
        let max_connections = count(
            self,
            raw.and_then(|s| s.max_connections.as_ref()),
            "server.max_connections",
            DEFAULT_MAX_CONNECTIONS,
            1..=MAX_MAX_CONNECTIONS,
        );
        let body_idle_timeout = server_duration(
            self,
            |s| s.body_idle_timeout.as_ref(),
            "server.body_idle_timeout",
            DEFAULT_BODY_IDLE_TIMEOUT,
        );
        let replay_memory = size(
            self,
            raw.and_then(|s| s.replay_memory.as_ref()),
            "server.replay_memory",
            DEFAULT_REPLAY_MEMORY,
        );
        let http2_max_concurrent_streams = count(
            self,
            raw.and_then(|s| s.http2_max_concurrent_streams.as_ref()),
            "server.http2_max_concurrent_streams",
            DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS as usize,
            1..=MAX_HTTP2_MAX_CONCURRENT_STREAMS as usize,
        );
        let upgraded_idle_timeout = server_duration(
            self,
            |s| s.upgraded_idle_timeout.as_ref(),
            "server.upgraded_idle_timeout",
            DEFAULT_UPGRADED_IDLE_TIMEOUT,
        );
        Server {
            upgraded_idle_timeout,
            shutdown_grace,
            header_read_timeout,
            idle_timeout,
            max_header_bytes,
            max_connections,
            body_idle_timeout,
            replay_memory,
            http2_max_concurrent_streams: u32::try_from(http2_max_concurrent_streams)
                .unwrap_or(DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS),
        }
    }

    /// `[log]`: the level must be a filter `tracing` accepts.
    fn log(&mut self, raw: Option<&file::Log>) -> Log {
        let level = match raw.and_then(|l| l.level.as_ref()) {
            Some(level) => {
                if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(level.get_ref()) {
                    self.problem(
                        level.span(),
                        "log.level",
                        format!("{:?} is not a level or filter: {e}", level.get_ref()),
                    );
                }
                level.get_ref().clone()
            }
            None => DEFAULT_LOG_LEVEL.to_owned(),
        };
        Log {
            level,
            format: match raw.and_then(|l| l.format) {
                None | Some(file::LogFormat::Text) => LogFormat::Text,
                Some(file::LogFormat::Json) => LogFormat::Json,
            },
            access: raw.and_then(|l| l.access).unwrap_or(false),
            audit: raw.and_then(|l| l.audit).unwrap_or(true),
        }
    }

    /// `file:line:column` of where `span` starts.
    pub(super) fn place(&self, span: &Range<usize>) -> String {
        self.sources.place(span.start).to_string()
    }

    /// Whether two spans are in different files.
    pub(super) fn other_file(&self, a: &Range<usize>, b: &Range<usize>) -> bool {
        self.sources.place(a.start).index != self.sources.place(b.start).index
    }

    /// Records a problem at the byte offset where `span` starts.
    pub(super) fn problem(
        &mut self,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let place = self.sources.place(span.start);
        self.problems.push(Problem {
            file: place.path.to_owned(),
            file_index: place.index,
            line: place.line,
            column: place.column,
            key: key.into(),
            message: message.into(),
        });
    }
}

/// `upstream[0].token.url` out of serde's path, without the segments `Spanned` adds.
fn key_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut key = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => key.push_str(&format!("[{index}]")),
            Segment::Map { key: name } | Segment::Enum { variant: name } => {
                if name.starts_with("$__serde_spanned") {
                    continue;
                }
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(name);
            }
            Segment::Unknown => {}
        }
    }
    if key.is_empty() {
        "(top level)".into()
    } else {
        key
    }
}

/// The key names of serde's path from the top, without array indices and the segments
/// `Spanned` adds: `["upstream", "token", "url"]`.
fn key_names(path: &serde_path_to_error::Path) -> Vec<&str> {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|segment| match segment {
            Segment::Map { key: name } | Segment::Enum { variant: name } => Some(name.as_str()),
            Segment::Seq { .. } | Segment::Unknown => None,
        })
        .filter(|name| !name.starts_with("$__serde_spanned"))
        .collect()
}
