//! The deployment files against the code: every metric the Grafana dashboard and the
//! Prometheus alerts (and their unit tests) query is one bearerd exports, and the Kubernetes
//! config loads with bearerd's own loader. `scripts/check-deploy.sh` checks the rest
//! (kustomize build, Kubernetes schemas, promtool).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bearerd::config::Config;
use bearerd::secret::SecretSource;
use bearerd::sidecar::MetricFamilies;

/// The files whose queries must name real metrics.
const QUERYING_FILES: &[&str] = &[
    "deploy/grafana/bearerd-dashboard.json",
    "deploy/prometheus/alerts.yml",
    "deploy/prometheus/alerts_test.yml",
];

/// Series Prometheus makes itself for every target, not exported by bearerd.
const PROMETHEUS_OWN: &[&str] = &["up"];

/// Families registered only when a feature is configured, so not in the scrape of a fresh
/// registry: name, type, and the file that registers it (checked to name it).
const FEATURE_FAMILIES: &[(&str, &str, &str)] = &[
    (
        "bearerd_telemetry_spans_dropped_total",
        "counter",
        "src/telemetry.rs",
    ),
    (
        "bearerd_intercept_tunnels_total",
        "counter",
        "src/proxy/intercept/metrics.rs",
    ),
    (
        "bearerd_intercept_certificates_issued_total",
        "counter",
        "src/proxy/intercept/metrics.rs",
    ),
    (
        "bearerd_intercept_handshake_failures_total",
        "counter",
        "src/proxy/intercept/metrics.rs",
    ),
];

fn repo_file(relative: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    (path, text)
}

/// Metric families bearerd exports, by name, with their type (`counter`, `histogram`, ...),
/// from the `# TYPE` lines of a scrape of a fresh registry with one upstream.
fn exported_families() -> BTreeMap<String, String> {
    let families = MetricFamilies::new().unwrap();
    let upstream = families.upstream("x");
    // bearerd_requests_total has a series per status code, made when the code first occurs;
    // until then the family is not in a scrape at all.
    upstream
        .proxy
        .request_answered(http::StatusCode::OK, Duration::ZERO);
    // So are the cache's families until it is used, and the source's info until it is
    // described.
    families.cache_up("redis").set(1);
    upstream.token.cache_operation("redis", "get", "hit");
    let config = Config::parse(
        Path::new("x.toml"),
        "[[upstream]]\nname = \"x\"\nlisten = \"127.0.0.1:0\"\nurl = \"https://x.example\"\n\
         [upstream.token]\nurl = \"https://id.example/token\"\nclient_id = \"a\"\nclient_secret = \"b\"\n",
    )
    .unwrap();
    upstream.token.describe_source(&config.upstreams[0].token);
    let text = families.registry.render().unwrap();
    let families: BTreeMap<String, String> = text
        .lines()
        .filter_map(|line| {
            let mut words = line.strip_prefix("# TYPE ")?.split_whitespace();
            Some((words.next()?.to_owned(), words.next()?.to_owned()))
        })
        .collect();
    assert!(
        families.contains_key("bearerd_token_valid"),
        "no # TYPE lines parsed from:\n{text}"
    );
    let mut families = families;
    for (name, kind, registered_in) in FEATURE_FAMILIES {
        let (path, source) = repo_file(registered_in);
        assert!(
            source.contains(&format!("\"{name}\"")),
            "{} does not register {name}",
            path.display()
        );
        families.insert((*name).to_owned(), (*kind).to_owned());
    }
    families
}

/// Every word in `text` that starts with `bearerd_` or `process_` and goes on with
/// `[a-z0-9_]`, and `up` where it is followed by `{` (a selector, not the English word).
fn queried_names(text: &str) -> BTreeSet<String> {
    let is_name_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    let mut names = BTreeSet::new();
    for (start, _) in text.char_indices() {
        let before = text[..start].chars().next_back();
        if before.is_some_and(|c| is_name_char(c) || c.is_ascii_uppercase()) {
            continue;
        }
        let rest = &text[start..];
        let end = rest.find(|c| !is_name_char(c)).unwrap_or(rest.len());
        let word = &rest[..end];
        let prefixed = ["bearerd_", "process_"]
            .iter()
            .any(|p| word.len() > p.len() && word.starts_with(p));
        let selector = word == "up" && rest[end..].starts_with('{');
        if prefixed || selector {
            names.insert(word.to_owned());
        }
    }
    names
}

/// Why `name` is not a series bearerd (or Prometheus, for `up`) provides, if it is not.
fn problem(name: &str, families: &BTreeMap<String, String>) -> Option<String> {
    if families.contains_key(name) || PROMETHEUS_OWN.contains(&name) {
        return None;
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            return match families.get(base).map(String::as_str) {
                Some("histogram") => None,
                Some(kind) => Some(format!("{name}: {base} is a {kind}, not a histogram")),
                None => Some(format!("{name}: no metric family {base}")),
            };
        }
    }
    Some(format!("{name}: no such metric family"))
}

/// Problems with the metric names in `text`.
fn problems(text: &str, families: &BTreeMap<String, String>) -> Vec<String> {
    queried_names(text)
        .iter()
        .filter_map(|name| problem(name, families))
        .collect()
}

#[test]
fn dashboard_and_alerts_query_only_exported_metrics() {
    let families = exported_families();
    for relative in QUERYING_FILES {
        let (path, text) = repo_file(relative);
        let names = queried_names(&text);
        assert!(
            names.len() >= 3,
            "{}: found only {names:?}; is the scan broken?",
            path.display()
        );
        let problems = problems(&text, &families);
        assert!(
            problems.is_empty(),
            "{} queries metrics bearerd does not export:\n  {}\nexported: {:?}",
            path.display(),
            problems.join("\n  "),
            families.keys().collect::<Vec<_>>()
        );
    }
}

#[test]
fn dashboard_shows_what_the_issue_asks_for() {
    let (_, text) = repo_file("deploy/grafana/bearerd-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(dashboard["uid"], "bearerd");
    let names = queried_names(&text);
    for needed in [
        "bearerd_token_valid",
        "bearerd_token_expiry_timestamp_seconds",
        "bearerd_token_fetch_total",
        "bearerd_requests_total",
        "bearerd_request_duration_seconds_bucket",
        "bearerd_token_source_info",
        "bearerd_token_source_restarts_total",
        "bearerd_dpop_nonce_retries_total",
        "bearerd_token_cache_up",
        "bearerd_token_cache_operations_total",
        "bearerd_connections_refused_total",
        "bearerd_telemetry_spans_dropped_total",
        "bearerd_upgraded_connections_open",
        "bearerd_upgraded_bytes_total",
        "bearerd_intercept_tunnels_total",
        "bearerd_intercept_handshake_failures_total",
    ] {
        assert!(
            names.contains(needed),
            "the dashboard does not query {needed}"
        );
    }
}

#[test]
fn alerts_cover_tokens_liveness_and_errors() {
    let (_, text) = repo_file("deploy/prometheus/alerts.yml");
    let alerts: BTreeSet<&str> = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .collect();
    let (_, tests) = repo_file("deploy/prometheus/alerts_test.yml");
    for alert in [
        "BearerdDown",
        "BearerdTokenFetchFailing",
        "BearerdTokenRefreshOverdue",
        "BearerdTokenExpiringSoon",
        "BearerdNoValidToken",
        "BearerdHigh5xxRatio",
        "BearerdTokenSourceRestarting",
        "BearerdTokenCacheDown",
        "BearerdListenerFull",
        "BearerdAuthorisationLost",
    ] {
        assert!(alerts.contains(alert), "alerts.yml has no {alert}");
    }
    for alert in alerts {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "alerts_test.yml does not test {alert}"
        );
    }
}

#[test]
fn a_misspelt_or_misused_metric_is_noticed() {
    let families = exported_families();
    let text = r#"
        rate(bearerd_request_total[5m])
        histogram_quantile(0.9, rate(bearerd_request_duration_seconds_bucket[5m]))
        rate(bearerd_requests_total_bucket[5m])
        process_resident_memory_byte{job="bearerd"}
        up{job="bearerd"} == 0 and upstream
        TYPEbearerd_not_a_name
    "#;
    assert_eq!(
        problems(text, &families),
        [
            "bearerd_request_total: no such metric family",
            "bearerd_requests_total_bucket: bearerd_requests_total is a counter, not a histogram",
            "process_resident_memory_byte: no such metric family",
        ]
    );
}

/// The config of deploy/kubernetes/app with a component's conf.d file merged in, as the pod
/// mounts them (/etc/bearerd/bearerd.toml and /etc/bearerd/conf.d/).
fn with_component(component: &str, file: &str) -> Config {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let files = [
        (
            root.join("app/bearerd.toml"),
            "/etc/bearerd/bearerd.toml".to_owned(),
        ),
        (
            root.join("components/sidecar/sidecar.toml"),
            "/etc/bearerd/conf.d/sidecar.toml".to_owned(),
        ),
        (
            root.join("components").join(component).join(file),
            format!("/etc/bearerd/conf.d/{file}"),
        ),
    ];
    let files = files
        .into_iter()
        .map(|(from, name)| (name.into(), std::fs::read_to_string(from).unwrap()))
        .collect();
    Config::parse_files(files).unwrap_or_else(|e| panic!("{component}: {e}"))
}

/// The components without a client secret: each loads beside the app's config, and its
/// upstream's credentials are files under /var/run/secrets/, where its patch mounts them.
#[test]
fn credential_components_load_with_their_mounted_files() {
    use bearerd::config::ClientAuth;
    for (component, method) in [
        ("workload-identity", "client_assertion_file"),
        ("mtls", "tls_client_auth"),
    ] {
        let config = with_component(component, &format!("{component}.toml"));
        assert_eq!(
            config.upstreams.len(),
            2,
            "{component}: the app's and its own"
        );
        let upstream = &config.upstreams[1];
        assert_eq!(upstream.token.auth.method(), method, "{component}");
        assert!(
            upstream.token.auth.secret().is_none(),
            "{component}: no secret"
        );
        let files: Vec<&Path> = match &upstream.token.auth {
            ClientAuth::AssertionFile { path } => vec![path.as_path()],
            ClientAuth::TlsClientAuth { identity } => {
                vec![identity.cert_file.as_path(), identity.key_file.as_path()]
            }
            other => panic!("{component}: {other:?}"),
        };
        for file in files {
            assert!(
                file.starts_with("/var/run/secrets/"),
                "{component}: {}",
                file.display()
            );
        }
    }
}

/// Every component's file merges with the app's config and with each other's but the two
/// caches, which both set [cache]: the error names both files.
#[test]
fn components_compose_and_the_two_caches_collide() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let mut files = vec![
        ("/etc/bearerd/bearerd.toml".into(), read("app/bearerd.toml")),
        (
            "/etc/bearerd/conf.d/cache.toml".into(),
            read("components/cache-redis/cache.toml"),
        ),
    ];
    for component in ["forward-proxy", "mtls", "workload-identity"] {
        files.push((
            format!("/etc/bearerd/conf.d/{component}.toml").into(),
            read(&format!("components/{component}/{component}.toml")),
        ));
    }
    let config = Config::parse_files(files.clone()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.upstreams.len(), 4);
    assert!(config.cache.is_some());
    files.push((
        "/etc/bearerd/conf.d/file-cache.toml".into(),
        read("components/cache-file/cache.toml"),
    ));
    let error = Config::parse_files(files).unwrap_err().to_string();
    assert!(
        error.contains("/etc/bearerd/conf.d/file-cache.toml:")
            && error.contains("is set twice: first at /etc/bearerd/conf.d/cache.toml:"),
        "{error}"
    );
}

#[test]
fn kubernetes_config_loads_and_fits_the_pod() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/app/bearerd.toml");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    // Probes and scrapes come to the pod IP, on the port the manifests name.
    assert_eq!(config.admin.listen.to_string(), "0.0.0.0:9464");
    // Below terminationGracePeriodSeconds: 30 in deployment.yaml.
    assert!(config.server.shutdown_grace < Duration::from_secs(30));
    assert!(!config.upstreams.is_empty());
    for upstream in &config.upstreams {
        assert_eq!(
            upstream.listen.ip(),
            Ipv4Addr::LOCALHOST,
            "{}: proxy listeners stay on loopback",
            upstream.name
        );
        let Some(SecretSource::File(secret)) = upstream.token.auth.secret() else {
            panic!(
                "{}: the secret should come from a mounted file",
                upstream.name
            )
        };
        assert!(
            secret.starts_with("/var/run/secrets/"),
            "{}: {} is not where the sidecar component mounts Secrets",
            upstream.name,
            secret.display()
        );
    }
}
