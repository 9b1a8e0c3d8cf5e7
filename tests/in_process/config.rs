//! Config loading: the example file, and each kind of mistake with the message a user sees.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::needless_pass_by_value
)]

use crate::support;

use std::path::Path;
use std::time::Duration;

use bearerd::config::{ClientAuth, Config, ConfigError, Roots};
use bearerd::secret::SecretSource;
use support::config::{
    payments, payments_token, string, Admin, ConfigBuilder, Server, Tls, Token, Upstream, VALID,
};

#[test]
fn example_config_loads_with_every_key() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.admin.listen.to_string(), "127.0.0.1:9464");
    assert_eq!(config.log.level, "info");
    assert_eq!(config.log.format, bearerd::config::LogFormat::Text);
    assert!(!config.log.access);
    assert_eq!(config.server.shutdown_grace, Duration::from_secs(20));
    assert_eq!(config.server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(config.server.idle_timeout, Duration::from_secs(60));
    assert_eq!(config.server.max_header_bytes, 65536);
    assert_eq!(config.server.max_connections, 512);
    let [upstream] = config.upstreams.as_slice() else {
        panic!("one upstream expected")
    };
    assert_eq!(upstream.name, "payments");
    assert_eq!(upstream.listen.to_string(), "127.0.0.1:8081");
    assert_eq!(upstream.url, "https://api.example.com/v2");
    assert_eq!(upstream.connect_timeout, Duration::from_secs(5));
    assert_eq!(upstream.response_header_timeout, Duration::from_secs(30));
    assert!(upstream.retry_on_401);
    let token = &upstream.token;
    assert_eq!(token.url, "https://auth.example.com/oauth/token");
    assert_eq!(token.client_id.as_deref(), Some("abc"));
    assert_eq!(
        token.auth,
        ClientAuth::Basic {
            secret: SecretSource::File("/var/run/secrets/payments/client_secret".into())
        }
    );
    assert_eq!(token.scope.as_deref(), Some("read write"));
    assert_eq!(token.audience.as_deref(), Some("https://api.example.com"));
    assert_eq!(token.resource.as_deref(), Some("https://api.example.com"));
    assert_eq!(token.params["organization"], "org_123");
    assert_eq!(token.timeout, Duration::from_secs(10));
    assert_eq!(token.default_lifetime, Duration::from_secs(300));
    assert_eq!(token.backoff_base, Duration::from_secs(1));
    assert_eq!(token.backoff_cap, Duration::from_secs(60));
    assert_eq!(upstream.tls.roots, Roots::Webpki);
    assert_eq!(
        upstream.tls.ca_file.as_deref(),
        Some(Path::new("/etc/bearerd/ca.pem"))
    );
}

/// A file of `upstream` alone. Its lines are numbered as in [`VALID`]: one line per setting,
/// in the order set, and a blank line before `[upstream.token]`.
fn only(upstream: Upstream) -> String {
    ConfigBuilder::empty().upstream(upstream).render()
}

/// The token table of [`VALID`] without its secret.
fn token() -> Token {
    Token::new("https://auth.example.com/oauth/token", "abc")
}

/// The problems reported for `text`, as printed.
fn errors(text: &str) -> String {
    match Config::parse(Path::new("/etc/bearerd/bearerd.toml"), text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(error @ ConfigError::Invalid { .. }) => error.to_string(),
        Err(other) => panic!("unexpected {other:?}"),
    }
}

#[test]
fn the_builder_writes_the_valid_config_to_the_byte() {
    assert_eq!(only(payments()), VALID);
}

#[test]
fn the_builder_escapes_what_it_writes() {
    let awkward = "a \"quoted\" \\ 'back\tslash'\nnew line\u{1}\u{7f} ü #not a comment";
    let text = only(
        payments().token(
            Token::new("https://auth.example.com/t", awkward)
                .secret(awkward)
                .params(&[("odd key", awkward)]),
        ),
    );
    // One line per setting, whatever the value holds.
    assert_eq!(text.lines().count(), VALID.lines().count() + 1, "{text}");
    let config =
        Config::parse(Path::new("/b.toml"), &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let token = &config.upstreams[0].token;
    assert_eq!(token.client_id.as_deref(), Some(awkward));
    assert_eq!(
        token.auth.secret(),
        Some(&SecretSource::Inline(bearerd::secret::Secret::new(awkward)))
    );
    assert_eq!(token.params["odd key"], awkward);
}

#[test]
fn minimal_config_gets_the_defaults() {
    let config = Config::parse(Path::new("/etc/bearerd/bearerd.toml"), VALID).unwrap();
    assert_eq!(config.admin.listen.to_string(), "127.0.0.1:9464");
    let upstream = &config.upstreams[0];
    assert_eq!(
        upstream.token.auth,
        ClientAuth::Basic {
            secret: SecretSource::Env("PAYMENTS_SECRET".into())
        }
    );
    assert_eq!(
        upstream.connect_timeout,
        bearerd::config::DEFAULT_CONNECT_TIMEOUT
    );
    assert_eq!(upstream.tls.roots, Roots::Webpki);
    assert_eq!(upstream.tls.ca_file, None);
}

#[test]
fn relative_paths_are_taken_from_the_config_directory() {
    let text = only(
        payments()
            .token(token().secret_file("secrets/payments"))
            .tls(Tls::new().ca_file("ca.pem")),
    );
    let config = Config::parse(Path::new("/etc/bearerd/bearerd.toml"), &text).unwrap();
    let upstream = &config.upstreams[0];
    assert_eq!(
        upstream.token.auth.secret(),
        Some(&SecretSource::File("/etc/bearerd/secrets/payments".into()))
    );
    assert_eq!(
        upstream.tls.ca_file.as_deref(),
        Some(Path::new("/etc/bearerd/ca.pem"))
    );
}

#[test]
fn unknown_key() {
    let text = only(
        payments().token(
            Token::empty()
                .url("https://auth.example.com/oauth/token")
                .set("scopes", string("x")) // line 8
                .client_id("abc")
                .secret_env("PAYMENTS_SECRET"),
        ),
    );
    assert!(
        errors(&text).starts_with(
            "/etc/bearerd/bearerd.toml:8:1: upstream[0].token.scopes: unknown key `scopes`; did you mean `scope`? The keys of [upstream.token] are `url`, `client_id`,"
        ),
        "{}",
        errors(&text)
    );
    let text = format!("{VALID}[upstream.tsl]\nca_file = \"x\"\n");
    assert!(
        errors(&text)
            .starts_with("/etc/bearerd/bearerd.toml:10:11: upstream[0].tsl: unknown key `tsl`; did you mean `tls`?"),
        "{}",
        errors(&text)
    );
}

#[test]
fn missing_required_key() {
    let text = only(
        Upstream::named("payments")
            .listen("127.0.0.1:8081")
            .token(payments_token()),
    );
    assert_eq!(
        errors(&text),
        "/etc/bearerd/bearerd.toml:1:1: upstream[0]: missing field `url`"
    );
}

#[test]
fn secret_sources_two_or_none() {
    let text = only(payments().token(payments_token().secret("inline")));
    assert_eq!(
        errors(&text),
        "/etc/bearerd/bearerd.toml:10:17: upstream[0].token.client_secret: more than one client secret source: set only one of client_secret_file, client_secret_env or client_secret"
    );
    let text = only(payments().token(token()));
    assert_eq!(
        errors(&text),
        "/etc/bearerd/bearerd.toml:6:1: upstream[0].token.client_secret_file: no client secret: set one of client_secret_file, client_secret_env or client_secret"
    );
}

#[test]
fn two_upstreams_on_one_address() {
    let text = ConfigBuilder::empty()
        .upstream(payments())
        .upstream(payments().name("orders"))
        .render();
    assert_eq!(
        errors(&text),
        "/etc/bearerd/bearerd.toml:13:10: upstream[1].listen: 127.0.0.1:8081 is already the listen address of upstream \"payments\""
    );
    let text = ConfigBuilder::empty()
        .admin(Admin::new().listen("127.0.0.1:8081"))
        .upstream(payments())
        .render();
    assert!(
        errors(&text).contains(
            "upstream[0].listen: 127.0.0.1:8081 is already the listen address of [admin]"
        ),
        "{}",
        errors(&text)
    );
}

#[test]
fn duplicate_names() {
    let text = ConfigBuilder::empty()
        .upstream(payments())
        .upstream(payments().listen("127.0.0.1:8082"))
        .render();
    assert_eq!(
        errors(&text),
        "/etc/bearerd/bearerd.toml:12:8: upstream[1].name: \"payments\" is already the name of upstream[0]"
    );
}

#[test]
fn non_http_urls() {
    let text = only(payments().url("ftp://api.example.com/v2"));
    assert_eq!(
        errors(&text),
        "/etc/bearerd/bearerd.toml:4:7: upstream[0].url: \"ftp://api.example.com/v2\": scheme \"ftp\" is not http or https"
    );
    let text = only(payments().token(payments_token().url("auth.example.com/oauth/token")));
    assert_eq!(
        errors(&text),
        "/etc/bearerd/bearerd.toml:7:7: upstream[0].token.url: \"auth.example.com/oauth/token\" is not an absolute http or https URL"
    );
    let text = only(payments().url("https://api.example.com/v2?key=1"));
    assert_eq!(
        errors(&text),
        "/etc/bearerd/bearerd.toml:4:7: upstream[0].url: must not have a query: the app's query is passed through"
    );
}

#[test]
fn bad_values() {
    let text = only(
        payments().listen("localhost").token(
            token()
                .timeout("ten seconds") // line 9
                .secret_env("PAYMENTS_SECRET"),
        ),
    );
    assert_eq!(
        errors(&text),
        "/etc/bearerd/bearerd.toml:3:10: upstream[0].listen: \"localhost\" is not an IP address and port such as \"127.0.0.1:8081\"\n\
         /etc/bearerd/bearerd.toml:9:11: upstream[0].token.timeout: \"ten seconds\" is not a duration such as \"10s\" or \"2m\": expected number at 0"
    );
    let text = only(payments().token(token().auth("jwt").secret_env("PAYMENTS_SECRET")));
    assert!(
        errors(&text).starts_with(
            "/etc/bearerd/bearerd.toml:9:8: upstream[0].token.auth: unknown variant `jwt`, expected one of `basic`, `post`, `client_secret_jwt`, `private_key_jwt`, `client_assertion_file`, `tls_client_auth`"
        ),
        "{}",
        errors(&text)
    );
    let text = only(
        payments().token(
            token()
                .params(&[("grant_type", "password")])
                .secret_env("PAYMENTS_SECRET"),
        ),
    );
    assert_eq!(
        errors(&text),
        "/etc/bearerd/bearerd.toml:9:10: upstream[0].token.params.grant_type: grant_type is set by bearerd; use the dedicated key instead"
    );
    let text = only(payments().url("https://api.example.com:128081/v2"));
    assert_eq!(
        errors(&text),
        "/etc/bearerd/bearerd.toml:4:7: upstream[0].url: \"https://api.example.com:128081/v2\": the port is not a number from 0 to 65535"
    );
    let text = ConfigBuilder::empty()
        .server(Server::new().max_header_bytes(100).max_connections(0))
        .upstream(payments())
        .render();
    assert_eq!(
        errors(&text),
        "/etc/bearerd/bearerd.toml:2:20: server.max_header_bytes: must be a whole number of at least 8192\n\
         /etc/bearerd/bearerd.toml:3:19: server.max_connections: must be a whole number from 1 to 1000000"
    );
    // The listener's connection count is a semaphore's size: bounded so that it cannot panic.
    let text = ConfigBuilder::empty()
        .server(Server::new().set("max_connections", "10000000000000000000"))
        .upstream(payments())
        .render();
    assert!(
        errors(&text).contains("server.max_connections"),
        "{}",
        errors(&text)
    );
    let text = ConfigBuilder::empty()
        .server(Server::new().max_connections(4_000_000_000))
        .upstream(payments())
        .render();
    assert_eq!(
        errors(&text),
        "/etc/bearerd/bearerd.toml:2:19: server.max_connections: must be a whole number from 1 to 1000000"
    );
    let text = only(payments().name("pay ments"));
    assert!(errors(&text).contains("upstream[0].name: \"pay ments\" is not a valid name"));
}

#[test]
fn syntax_error_and_empty_file() {
    assert_eq!(
        errors("[[upstream]\nname = 1\n"),
        "/etc/bearerd/bearerd.toml:1:12: (syntax): unclosed array table, expected `]`"
    );
    assert_eq!(
        errors(""),
        "/etc/bearerd/bearerd.toml:1:1: upstream: no [[upstream]] or [[listener]] is configured"
    );
}

#[test]
fn wrong_type_names_the_key() {
    let text = only(payments().token(payments_token().set("client_id", 42)));
    assert!(
        errors(&text).starts_with(
            "/etc/bearerd/bearerd.toml:8:13: upstream[0].token.client_id: invalid type: integer `42`, expected a string"
        ),
        "{}",
        errors(&text)
    );
}

#[test]
fn missing_file_names_it() {
    let error = Config::load(Path::new("/nonexistent/bearerd.toml")).unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("cannot read config file /nonexistent/bearerd.toml: "),
        "{error}"
    );
}

#[test]
fn a_listener_off_loopback_needs_allow_from() {
    let text = only(payments().listen("0.0.0.0:8081"));
    let message = errors(&text);
    assert!(
        message.starts_with("/etc/bearerd/bearerd.toml:3:10: upstream[0].listen: 0.0.0.0:8081 is not a loopback address: whoever reaches it calls the upstream with bearerd's token."),
        "{message}"
    );
    for listen in ["[::]:8081", "10.1.2.3:8081"] {
        let text = only(payments().listen(listen));
        assert!(errors(&text).contains("set allow_from"), "{listen}");
    }
    let allowed = only(payments().listen("0.0.0.0:8081").allow_from(&[
        "10.0.0.0/8",
        "fd00::/8",
        "192.168.1.7",
    ]));
    let config = Config::parse(Path::new("/etc/bearerd/bearerd.toml"), &allowed).unwrap();
    let networks: Vec<String> = config.upstreams[0]
        .allow_from
        .iter()
        .flatten()
        .map(ToString::to_string)
        .collect();
    assert_eq!(networks, ["10.0.0.0/8", "fd00::/8", "192.168.1.7/32"]);

    // allow_from on line 4, right after listen.
    let allowing = |networks: &[&str]| {
        only(
            Upstream::named("payments")
                .listen("127.0.0.1:8081")
                .allow_from(networks)
                .url("https://api.example.com/v2")
                .token(payments_token()),
        )
    };
    let empty = allowing(&[]);
    assert_eq!(
        errors(&empty),
        "/etc/bearerd/bearerd.toml:4:14: upstream[0].allow_from: is empty, so no one could connect: list the networks that may, such as \"10.0.0.0/8\""
    );
    let wrong = allowing(&["10.0.0.0/33"]);
    assert_eq!(
        errors(&wrong),
        "/etc/bearerd/bearerd.toml:4:15: upstream[0].allow_from: \"10.0.0.0/33\" is not a network such as \"10.0.0.0/8\", \"fd00::/8\" or an address"
    );
}

#[test]
fn urls_with_a_password_are_refused_without_echoing_it() {
    for (text, key) in [
        (
            only(payments().url("https://user:hunter2@api.example.com/v2")),
            "upstream[0].url",
        ),
        (
            only(
                payments()
                    .token(payments_token().url("https://id:hunter2@auth.example.com:99999/t")),
            ),
            "upstream[0].token.url",
        ),
    ] {
        let message = errors(&text);
        assert!(
            message.contains(&format!("{key}: must not hold a user name or password")),
            "{message}"
        );
        assert!(!message.contains("hunter2"), "{message}");
    }
}

#[test]
fn plain_http_to_a_remote_host_needs_allow_plain_http() {
    let plain_token = payments_token().url("http://auth.example.com/oauth/token");
    let text = only(payments().token(plain_token.clone()));
    assert_eq!(
        errors(&text),
        "/etc/bearerd/bearerd.toml:7:7: upstream[0].token.url: \"http://auth.example.com/oauth/token\" is plain http to a host that is not loopback: credentials and tokens would cross the network in the clear. Use https, or set allow_plain_http = true in this table"
    );
    let allowed = only(payments().token(plain_token.allow_plain_http(true)));
    assert!(
        Config::parse(Path::new("/b.toml"), &allowed)
            .unwrap()
            .upstreams[0]
            .token
            .allow_plain_http
    );

    let plain = payments().url("http://api.example.com/v2");
    let text = only(plain.clone());
    assert!(errors(&text).contains("upstream[0].url: \"http://api.example.com/v2\" is plain http"));
    let allowed = only(plain.allow_plain_http(true));
    assert!(
        Config::parse(Path::new("/b.toml"), &allowed)
            .unwrap()
            .upstreams[0]
            .allow_plain_http
    );
    // Loopback needs no permission: the traffic never leaves the machine.
    for local in [
        "http://127.0.0.1:8080",
        "http://localhost:8080",
        "http://[::1]:8080",
    ] {
        let text = only(payments().url(&format!("{local}/v2")));
        assert!(
            Config::parse(Path::new("/b.toml"), &text).is_ok(),
            "{local}"
        );
    }
}

#[test]
fn lifetimes_bodies_and_durations_are_bounded() {
    let config = Config::parse(Path::new("/b.toml"), VALID).unwrap();
    assert_eq!(
        config.upstreams[0].token.max_lifetime,
        Duration::from_secs(86400)
    );
    assert_eq!(config.server.body_idle_timeout, Duration::from_secs(30));
    assert_eq!(config.server.replay_memory, 16 << 20);
    assert_eq!(config.admin.max_connections, 64);

    let text = only(
        payments().token(
            token()
                .max_lifetime("1m") // line 9
                .timeout("400d")
                .secret_env("PAYMENTS_SECRET"),
        ),
    );
    assert_eq!(
        errors(&text),
        "/etc/bearerd/bearerd.toml:9:16: upstream[0].token.max_lifetime: is shorter than default_lifetime (5m)\n\
         /etc/bearerd/bearerd.toml:10:11: upstream[0].token.timeout: must be at most a year (\"366d\")"
    );
    let text = ConfigBuilder::empty()
        .server(Server::new().replay_memory("16MB").body_idle_timeout("0s"))
        .upstream(payments())
        .render();
    assert_eq!(
        errors(&text),
        "/etc/bearerd/bearerd.toml:2:17: server.replay_memory: \"16MB\" is not a size such as \"16MiB\", \"512KiB\" or \"0\"\n\
         /etc/bearerd/bearerd.toml:3:21: server.body_idle_timeout: must be longer than zero"
    );
}

/// A forward listener with two routes, for the listener tests.
const LISTENER: &str = r#"
[[listener]]
listen = "127.0.0.1:3128"
mode = "forward"

[[listener.route]]
name = "payments"
host = "API.Payments.example."
path_prefix = "/v2/"
strip_prefix = true
url = "https://api.payments.example"
[listener.route.token]
url = "https://auth.example.com/token"
client_id = "app"
client_secret = "s"

[[listener.route]]
name = "orders"
host = "*.orders.example"
url = "https://orders.example"
[listener.route.token]
url = "https://auth.example.com/token"
client_id = "app"
client_secret = "s"
"#;

#[test]
fn a_listener_serves_its_routes_in_order() {
    let config = Config::parse(Path::new("/etc/bearerd/bearerd.toml"), LISTENER).unwrap();
    let [listener] = config.listeners.as_slice() else {
        panic!("one listener expected")
    };
    assert_eq!(listener.mode, bearerd::config::Mode::Forward);
    assert_eq!(listener.routes, ["payments", "orders"]);
    let payments = &config.upstreams[0];
    assert_eq!(payments.listen.to_string(), "127.0.0.1:3128");
    // Hosts lowercase without the trailing dot; prefixes without the trailing slash.
    assert_eq!(payments.route.host.as_deref(), Some("api.payments.example"));
    assert_eq!(payments.route.path_prefix.as_deref(), Some("/v2"));
    assert!(payments.route.strip_prefix);
    assert_eq!(
        config.upstreams[1].route.host.as_deref(),
        Some("*.orders.example")
    );
}

#[test]
fn listener_and_route_mistakes_name_the_key() {
    let cases = [
        (
            LISTENER.replace("host = \"*.orders.example\"\n", ""),
            "listener[0].route[1].host: missing: on a forward listener",
        ),
        (
            LISTENER.replace("path_prefix = \"/v2/\"", "path_prefix = \"/v2/../x\""),
            "listener[0].route[0].path_prefix: \"/v2/../x\" is not a path",
        ),
        (
            LISTENER.replace("*.orders.example", "a.*.example"),
            "listener[0].route[1].host: \"a.*.example\" is not a host name",
        ),
        (
            LISTENER.replace("name = \"orders\"", "name = \"payments\""),
            "listener[0].route[1].name: \"payments\" is already the name of listener[0].route[0]",
        ),
        (
            LISTENER.replace(
                "name = \"orders\"",
                "name = \"orders\"\nlisten = \"127.0.0.1:1\"",
            ),
            "listener[0].route[1].listen: belongs to the [[listener]]",
        ),
        (
            LISTENER.replace("mode = \"forward\"", "mode = \"sideways\""),
            "unknown variant `sideways`, expected `reverse` or `forward`",
        ),
        (
            LISTENER.replace("127.0.0.1:3128", "0.0.0.0:3128"),
            "listener[0].listen: 0.0.0.0:3128 is not a loopback address",
        ),
    ];
    for (text, expected) in cases {
        let message = errors(&text);
        assert!(message.contains(expected), "{expected:?} in:\n{message}");
    }
    // An [[upstream]] takes every request of its address: no host or path there.
    let upstream = "[[upstream]]\nname = \"a\"\nlisten = \"127.0.0.1:8081\"\nurl = \"https://api.example.com\"\nhost = \"api.example.com\"\n[upstream.token]\nurl = \"https://auth.example.com/t\"\nclient_id = \"app\"\nclient_secret = \"s\"\n";
    assert!(errors(upstream)
        .contains("upstream[0].host: routes by host and path are for [[listener.route]]"));
}

#[test]
fn check_prints_the_route_table_and_shadowed_routes() {
    let shadowed = LISTENER
        .replace("*.orders.example", "api.payments.example")
        .replace(
            "url = \"https://orders.example\"",
            "url = \"https://orders.example\"\npath_prefix = \"/v2\"",
        );
    let config = Config::parse(Path::new("/etc/bearerd/bearerd.toml"), &shadowed).unwrap();
    let out = bearerd::check::check(&config).unwrap();
    assert!(
        out.contains("listener 127.0.0.1:3128 (forward proxy (HTTP_PROXY): the requested host and path), routes in match order:\n  1. payments: api.payments.example, /v2 (stripped) -> https://api.payments.example/\n  2. orders: api.payments.example, /v2 -> https://orders.example/\n  WARNING: route orders can never match: payments comes first and takes the same requests"),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// What a newcomer trips on: each mistake gets the message an expert would give, still naming
// the file, line, column and key.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_single_table_where_an_array_of_tables_belongs_says_to_double_the_brackets() {
    let text = VALID.replace("[[upstream]]", "[upstream]");
    assert_eq!(
        errors(&text),
        "/etc/bearerd/bearerd.toml:1:1: upstream: `upstream` is an array of tables: write [[upstream]] (two brackets) at the head of each upstream, not [upstream]"
    );
    let listener = LISTENER.replace("[[listener]]", "[listener]");
    assert!(
        errors(&listener).contains(
            "listener: `listener` is an array of tables: write [[listener]] (two brackets) at the head of each listener, not [listener]"
        ),
        "{}",
        errors(&listener)
    );
    let route = "[[listener]]\nlisten = \"127.0.0.1:3128\"\n\n[listener.route]\nname = \"a\"\n";
    assert_eq!(
        errors(route),
        "/etc/bearerd/bearerd.toml:4:1: listener[0].route: `listener.route` is an array of tables: write [[listener.route]] (two brackets) at the head of each route, below its [[listener]], not [listener.route]"
    );
}

#[test]
fn a_number_where_a_duration_or_size_belongs_says_to_write_the_unit() {
    let text = only(payments().token(payments_token().set("timeout", 10))); // line 10
    assert_eq!(
        errors(&text),
        "/etc/bearerd/bearerd.toml:10:11: upstream[0].token.timeout: 10 has no unit: a duration is written as a string such as \"10s\", \"500ms\" or \"1m\" (\"10s\" for 10 seconds)"
    );
    let text = only(payments().set("connect_timeout", 1.5)); // line 5
    assert_eq!(
        errors(&text),
        "/etc/bearerd/bearerd.toml:5:19: upstream[0].connect_timeout: 1.5 has no unit: a duration is written as a string such as \"10s\", \"500ms\" or \"1m\""
    );
    let text = only(payments().set("response_header_timeout", true));
    assert!(
        errors(&text).contains(
            "upstream[0].response_header_timeout: invalid type: boolean `true`, expected a duration such as \"10s\", \"500ms\" or \"1m\""
        ),
        "{}",
        errors(&text)
    );
    let text = ConfigBuilder::empty()
        .server(Server::new().set("replay_memory", 16_777_216))
        .upstream(payments())
        .render();
    assert_eq!(
        errors(&text),
        "/etc/bearerd/bearerd.toml:2:17: server.replay_memory: 16777216 has no unit: a size is written as a string such as \"16MiB\", \"512KiB\" or \"4096B\" (\"16777216B\" for 16777216 bytes)"
    );
}

#[test]
fn a_misspelt_key_gets_the_nearest_key_of_its_own_table() {
    let cases = [
        // A slip of one letter, of case, of a dash for an underscore, of two letters swapped.
        (
            only(payments().token(payments_token().set("scopes", string("read")))),
            "10:1: upstream[0].token.scopes: unknown key `scopes`; did you mean `scope`?",
        ),
        (
            only(payments().token(payments_token().set("Client-Secret", string("s")))),
            "did you mean `client_secret`?",
        ),
        (
            only(payments().set("conect_timeout", string("5s"))),
            "5:1: upstream[0].conect_timeout: unknown key `conect_timeout`; did you mean `connect_timeout`?",
        ),
        (
            format!("[sever]\nidle_timeout = \"1m\"\n{VALID}"),
            "1:2: sever: unknown key `sever`; did you mean `server`?",
        ),
        // A key written below the header of the wrong table.
        (
            only(payments().token(payments_token().set("connect_timeout", string("5s")))),
            "upstream[0].token.connect_timeout: unknown key `connect_timeout`: it belongs to [[upstream]], not to [upstream.token]",
        ),
    ];
    for (text, expected) in cases {
        let message = errors(&text);
        assert!(
            message.starts_with("/etc/bearerd/bearerd.toml:") && message.contains(expected),
            "{expected:?} in:\n{message}"
        );
    }
    // Nothing near: no guess, only the keys.
    let text = only(payments().token(payments_token().set("qqqq", string("x"))));
    let message = errors(&text);
    assert!(!message.contains("did you mean"), "{message}");
    assert!(
        message.contains("unknown key `qqqq`. The keys of [upstream.token] are `url`"),
        "{message}"
    );
}

#[test]
fn the_keys_offered_are_those_of_the_table_written() {
    // `[[upstream]]` and `[[listener.route]]` are read by one struct; each is offered its own.
    let text = only(payments().set("hots", string("api.example.com")));
    let message = errors(&text);
    let offered = message
        .split("The keys of [[upstream]] are ")
        .nth(1)
        .unwrap();
    for key in ["`listen`", "`allow_from`", "`url`", "`token`"] {
        assert!(offered.contains(key), "{key} in {message}");
    }
    for key in ["`host`", "`path_prefix`", "`strip_prefix`"] {
        assert!(!offered.contains(key), "{key} in {message}");
    }
    let text = LISTENER.replace("name = \"orders\"", "name = \"orders\"\nlistn = \"x\"");
    let message = errors(&text);
    let offered = message
        .split("The keys of [[listener.route]] are ")
        .nth(1)
        .unwrap_or_else(|| panic!("{message}"));
    for key in ["`host`", "`path_prefix`", "`strip_prefix`", "`url`"] {
        assert!(offered.contains(key), "{key} in {message}");
    }
    for key in ["`listen`", "`allow_from`"] {
        assert!(!offered.contains(key), "{key} in {message}");
    }
}

/// A config file `main` in a fresh directory, with `conf.d/` holding `extra` (name, text).
fn with_conf_d(main: &str, extra: &[(&str, &str)]) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bearerd.toml");
    std::fs::write(&path, main).unwrap();
    std::fs::create_dir(dir.path().join("conf.d")).unwrap();
    for (name, text) in extra {
        std::fs::write(dir.path().join("conf.d").join(name), text).unwrap();
    }
    (dir, path)
}

/// The problems of loading `path`, with the directory shown as `$DIR`.
fn load_errors(dir: &tempfile::TempDir, path: &Path) -> String {
    match Config::load(path) {
        Ok(_) => panic!("loaded"),
        Err(e) => e
            .to_string()
            .replace(&dir.path().display().to_string(), "$DIR"),
    }
}

const FORWARD: &str = r#"[[listener]]
listen = "127.0.0.1:3128"
mode = "forward"

[[listener.route]]
name = "inventory"
host = "api.inventory.example"
url = "https://api.inventory.example"

[listener.route.token]
url = "https://auth.example.com/oauth/token"
client_id = "inventory"
client_secret_env = "INVENTORY_SECRET"
"#;

#[test]
fn conf_d_files_are_merged_by_name_and_others_skipped() {
    let (dir, path) = with_conf_d(
        &format!("[admin]\nallow_from = [\"10.0.0.0/8\"]\n\n{VALID}"),
        &[
            ("20-forward.toml", FORWARD),
            ("10-admin.toml", "[admin]\nlisten = \"0.0.0.0:9464\"\n"),
            (
                "30-cache.toml",
                "[cache]\nbackend = \"file\"\ndir = \"tokens\"\n",
            ),
            // Not a .toml, and a ConfigMap volume's hidden entries: not read.
            ("notes.txt", "not toml"),
            ("..data.toml", "not = [toml"),
        ],
    );
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.admin.listen.to_string(), "0.0.0.0:9464");
    assert_eq!(
        config.admin.allow_from.as_ref().map(Vec::len),
        Some(1),
        "keys of one table from two files"
    );
    let names: Vec<_> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["payments", "inventory"]);
    assert_eq!(config.listeners.len(), 2);
    assert_eq!(
        config.cache,
        Some(bearerd::config::Cache::File {
            // Relative to the config file's directory, as in the config file.
            dir: dir.path().join("tokens"),
            key_file: None,
        })
    );
    let extra: Vec<_> = config
        .extra_files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(extra, ["10-admin.toml", "20-forward.toml", "30-cache.toml"]);
}

#[test]
fn no_conf_d_directory_is_no_extra_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bearerd.toml");
    std::fs::write(&path, VALID).unwrap();
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.extra_files.is_empty());
}

#[test]
fn a_key_set_in_two_files_names_both() {
    let (dir, path) = with_conf_d(
        &format!("[server]\nshutdown_grace = \"20s\"\n\n{VALID}"),
        &[("server.toml", "# mine\n[server]\nshutdown_grace = \"5s\"\n")],
    );
    assert_eq!(
        load_errors(&dir, &path),
        "$DIR/conf.d/server.toml:3:18: server.shutdown_grace: is set twice: first at \
         $DIR/bearerd.toml:2:18; a key is set in one file only (the config file or one file \
         of conf.d/)"
    );
    // A whole table set in two files is the same: its keys are set twice.
    let (dir, path) = with_conf_d(
        VALID,
        &[
            ("a.toml", "[cache]\nbackend = \"file\"\ndir = \"a\"\n"),
            ("b.toml", "[cache]\nbackend = \"redis\"\n"),
        ],
    );
    let errors = load_errors(&dir, &path);
    assert!(
        errors.starts_with(
            "$DIR/conf.d/b.toml:2:11: cache.backend: is set twice: first at $DIR/conf.d/a.toml:2:11"
        ),
        "{errors}"
    );
}

#[test]
fn a_route_or_address_in_two_files_names_both() {
    let (dir, path) = with_conf_d(VALID, &[("again.toml", VALID)]);
    let errors = load_errors(&dir, &path);
    assert!(
        errors.contains(
            "$DIR/conf.d/again.toml:2:8: upstream[1].name: \"payments\" is already the name of \
             upstream[0] (at $DIR/bearerd.toml:2:8)"
        ),
        "{errors}"
    );
    assert!(
        errors.contains(
            "$DIR/conf.d/again.toml:3:10: upstream[1].listen: 127.0.0.1:8081 is already the \
             listen address of upstream \"payments\" (at $DIR/bearerd.toml:3:10)"
        ),
        "{errors}"
    );
}

#[test]
fn problems_in_a_conf_d_file_have_its_line_and_column() {
    let (dir, path) = with_conf_d(
        VALID,
        &[(
            "forward.toml",
            &FORWARD.replace("\"forward\"", "\"sideways\""),
        )],
    );
    let errors = load_errors(&dir, &path);
    assert!(
        errors.starts_with("$DIR/conf.d/forward.toml:3:8: listener[0].mode:"),
        "{errors}"
    );
    let (dir, path) = with_conf_d(VALID, &[("broken.toml", "\n[server\n")]);
    let errors = load_errors(&dir, &path);
    assert!(errors.starts_with("$DIR/conf.d/broken.toml:2:"), "{errors}");
    let (dir, path) = with_conf_d(
        VALID,
        &[("late.toml", "[server]\nidle_timeout = \"soon\"\n")],
    );
    let errors = load_errors(&dir, &path);
    assert!(
        errors.starts_with("$DIR/conf.d/late.toml:2:16: server.idle_timeout:"),
        "{errors}"
    );
}

#[test]
fn telemetry_gets_its_defaults_and_its_mistakes_name_the_key() {
    let with = |table: &str| format!("{}\n[telemetry]\n{table}", only(payments()));
    let config = Config::parse(
        Path::new("/etc/bearerd/bearerd.toml"),
        &with("otlp_endpoint = \"http://collector.example:4318/otlp/\"\n"),
    )
    .unwrap();
    let telemetry = config.telemetry.unwrap();
    assert_eq!(
        telemetry.traces_url.to_string(),
        "http://collector.example:4318/otlp/v1/traces",
        "plain http to a collector is allowed; /v1/traces appended"
    );
    assert_eq!(telemetry.service_name, "bearerd");
    assert!((telemetry.sample_ratio - 0.05).abs() < f64::EPSILON);
    assert!(Config::parse(Path::new("/etc/bearerd/bearerd.toml"), VALID)
        .unwrap()
        .telemetry
        .is_none());

    let problems = errors(&with(
        "otlp_endpoint = \"http://127.0.0.1:4318/?x=1\"\nservice_name = \" \"\nsample_ratio = 1.5\n",
    ));
    for expected in [
        "telemetry.otlp_endpoint: \"http://127.0.0.1:4318/?x=1\" must be a base URL without a query",
        "telemetry.service_name: must not be empty",
        "telemetry.sample_ratio: 1.5 is not between 0 and 1",
    ] {
        assert!(problems.contains(expected), "{expected} in {problems}");
    }
    let problems = errors(&with("service_name = \"x\"\n"));
    assert!(problems.contains("otlp_endpoint"), "{problems}");
    let problems = errors(&with("otlp_endpoint = \"http://u:p@127.0.0.1:4318\"\n"));
    assert!(
        problems.contains("must not hold a user name or password"),
        "{problems}"
    );
}

#[test]
fn upgrade_and_stream_keys_have_their_defaults_and_refuse_h2c() {
    let config = Config::parse(Path::new("/etc/bearerd/bearerd.toml"), &only(payments())).unwrap();
    let upstream = &config.upstreams[0];
    assert_eq!(upstream.upgrade_protocols, ["websocket"]);
    assert_eq!(
        upstream.response_body_idle_timeout,
        Some(std::time::Duration::from_secs(300))
    );
    assert_eq!(
        config.server.upgraded_idle_timeout,
        std::time::Duration::from_secs(3600)
    );

    let text = only(
        payments()
            .set("upgrade_protocols", r#"["WebSocket", "x-feed/2"]"#)
            .set("response_body_idle_timeout", r#""0""#),
    );
    let config = Config::parse(Path::new("/etc/bearerd/bearerd.toml"), &text).unwrap();
    assert_eq!(
        config.upstreams[0].upgrade_protocols,
        ["websocket", "x-feed/2"]
    );
    assert_eq!(config.upstreams[0].response_body_idle_timeout, None);

    let text = only(payments().set("upgrade_protocols", r#"["h2c", "web socket"]"#));
    let message = errors(&text);
    assert!(
        message.contains("upgrade_protocols: h2c cannot be passed through"),
        "{message}"
    );
    assert!(
        message.contains(r#"upgrade_protocols: "web socket" is not a protocol name"#),
        "{message}"
    );
}

#[test]
fn egress_takes_an_http_proxy_without_credentials_and_no_proxy_entries() {
    let with = |egress: &str| format!("{VALID}\n[egress]\n{egress}\n");
    let config = Config::parse(
        Path::new("/etc/bearerd/bearerd.toml"),
        &with("proxy = \"http://proxy.corp:3128\"\nno_proxy = [\".svc.cluster.local\", \"10.0.0.0/8\"]\nproxy_authorization_file = \"proxy/basic\""),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let egress = config.egress.unwrap();
    assert_eq!(
        egress.no_proxy,
        vec![".svc.cluster.local".to_owned(), "10.0.0.0/8".to_owned()]
    );
    assert_eq!(
        egress.authorization_file.as_deref(),
        Some(Path::new("/etc/bearerd/proxy/basic"))
    );
    for (egress, says) in [
        (
            "proxy = \"http://alice:hunter2@proxy.corp:3128\"",
            "egress.proxy: \"http://proxy.corp:3128\" must not hold a user name or password",
        ),
        (
            "proxy = \"http://proxy.corp:3128\"\nuse_env = true",
            "egress.proxy: conflicts with use_env = true",
        ),
        ("no_proxy = [\"10.0.0.0/8\"]", "egress.proxy: missing"),
        (
            "proxy = \"http://proxy.corp:3128\"\nno_proxy = [\"*.example.com\"]",
            "egress.no_proxy: \"*.example.com\" is not a host suffix",
        ),
    ] {
        let message = errors(&with(egress));
        assert!(message.contains(says), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }
}
