//! A builder for the TOML text bearerd reads, so that a test names the settings it is about
//! instead of editing a config string.
//!
//! ```ignore
//! let text = ConfigBuilder::new()
//!     .server(Server::new().max_connections(2000))
//!     .upstream(
//!         Upstream::new("api", &upstream.url(""))
//!             .response_header_timeout("300ms")
//!             .token(Token::new(&endpoint.url("/token"), "app").secret("pw")),
//!     )
//!     .render();
//! ```
//!
//! The text comes out in the order of the calls, one `key = value` line per setting; setting a
//! key again replaces its line where it stands. A table's keys come before its subtables, and
//! every table header but one on the first line has a blank line before it. So a chain reads
//! like the file it renders, and `ConfigBuilder::empty().upstream(payments()).render()` is
//! [`VALID`] to the byte, line numbers included.
//!
//! Every table has `set(key, raw)` for a key the builder does not name yet (and for a value
//! that is wrong on purpose), and `table`/`array` where a subtable can be added. Named
//! settings escape their values as TOML; `set` writes its value as given (wrap a string in
//! [`string`] to escape it).

use std::fmt::Display;

/// A minimal valid config: one upstream, its secret from the environment. Tests of reported
/// line and column numbers count in this text.
pub const VALID: &str = r#"[[upstream]]
name = "payments"
listen = "127.0.0.1:8081"
url = "https://api.example.com/v2"

[upstream.token]
url = "https://auth.example.com/oauth/token"
client_id = "abc"
client_secret_env = "PAYMENTS_SECRET"
"#;

/// The upstream of [`VALID`], token table included.
pub fn payments() -> Upstream {
    Upstream::new("payments", "https://api.example.com/v2")
        .listen("127.0.0.1:8081")
        .token(payments_token())
}

/// The token table of [`VALID`].
pub fn payments_token() -> Token {
    Token::new("https://auth.example.com/oauth/token", "abc").secret_env("PAYMENTS_SECRET")
}

/// `text` as a TOML basic string, on one line: quotes, backslashes and control characters
/// escaped. For [`Table::set`]: `.set("scope", string("read"))`.
pub fn string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A TOML array of strings, on one line.
fn strings(items: &[&str]) -> String {
    let items: Vec<String> = items.iter().map(|item| string(item)).collect();
    format!("[{}]", items.join(", "))
}

/// A TOML inline table of strings, in the order given.
fn inline_table(entries: &[(&str, &str)]) -> String {
    let bare = |key: &str| {
        !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    let entries: Vec<String> = entries
        .iter()
        .map(|(key, value)| {
            let key = if bare(key) {
                (*key).to_owned()
            } else {
                string(key)
            };
            format!("{key} = {}", string(value))
        })
        .collect();
    format!("{{ {} }}", entries.join(", "))
}

/// Any table: its keys in the order set, then its subtables in the order added.
#[derive(Clone, Debug, Default)]
pub struct Table {
    keys: Vec<(String, String)>,
    children: Vec<Child>,
}

#[derive(Clone, Debug)]
struct Child {
    name: String,
    /// `[[name]]` rather than `[name]`.
    array: bool,
    table: Table,
}

impl Table {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `raw`, TOML text written as given: `42`, `"[1, 2]"`, `string("10s")`.
    pub fn set(mut self, key: &str, raw: impl Display) -> Self {
        let raw = raw.to_string();
        match self.keys.iter_mut().find(|(k, _)| k == key) {
            Some((_, value)) => *value = raw,
            None => self.keys.push((key.to_owned(), raw)),
        }
        self
    }

    /// Adds the subtable `[…name]`, or replaces it where it stands.
    pub fn table(mut self, name: &str, table: Table) -> Self {
        match self
            .children
            .iter_mut()
            .find(|c| c.name == name && !c.array)
        {
            Some(child) => child.table = table,
            None => self.children.push(Child {
                name: name.to_owned(),
                array: false,
                table,
            }),
        }
        self
    }

    /// Appends an element `[[…name]]` to an array of tables.
    pub fn array(mut self, name: &str, table: Table) -> Self {
        self.children.push(Child {
            name: name.to_owned(),
            array: true,
            table,
        });
        self
    }

    fn write(&self, path: &str, out: &mut String) {
        for (key, value) in &self.keys {
            out.push_str(&format!("{key} = {value}\n"));
        }
        for child in &self.children {
            let path = if path.is_empty() {
                child.name.clone()
            } else {
                format!("{path}.{}", child.name)
            };
            if !out.is_empty() {
                out.push('\n');
            }
            if child.array {
                out.push_str(&format!("[[{path}]]\n"));
            } else {
                out.push_str(&format!("[{path}]\n"));
            }
            child.table.write(&path, out);
        }
    }
}

/// The whole file.
#[derive(Clone, Debug)]
pub struct ConfigBuilder(Table);

impl ConfigBuilder {
    /// A file with `[admin]` on 127.0.0.1:0, as every test that starts bearerd needs.
    pub fn new() -> Self {
        Self::empty().admin(Admin::new())
    }

    /// A file with nothing in it yet.
    pub fn empty() -> Self {
        Self(Table::new())
    }

    /// Sets the `[admin]` table, or replaces it where it stands.
    pub fn admin(self, admin: Admin) -> Self {
        self.table("admin", admin.0)
    }

    /// Sets the `[server]` table, or replaces it where it stands.
    pub fn server(self, server: Server) -> Self {
        self.table("server", server.0)
    }

    /// Sets the `[log]` table, or replaces it where it stands.
    pub fn log(self, log: Log) -> Self {
        self.table("log", log.0)
    }

    /// Appends an `[[upstream]]`.
    pub fn upstream(self, upstream: Upstream) -> Self {
        self.array("upstream", upstream.0)
    }

    /// Appends a `[[listener]]`, with its `[[listener.route]]`.
    pub fn listener(self, listener: Listener) -> Self {
        self.array("listener", listener.0)
    }

    /// Sets a top-level key, TOML text written as given.
    pub fn set(self, key: &str, raw: impl Display) -> Self {
        Self(self.0.set(key, raw))
    }

    /// Adds a table `[name]` the builder does not name yet (`[cache]`), or replaces it.
    pub fn table(self, name: &str, table: Table) -> Self {
        Self(self.0.table(name, table))
    }

    /// Appends an element to an array of tables the builder does not name yet (`[[listener]]`;
    /// its `[[listener.route]]` are [`Table::array`] of the element).
    pub fn array(self, name: &str, table: Table) -> Self {
        Self(self.0.array(name, table))
    }

    /// The TOML text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.0.write("", &mut out);
        out
    }
}

/// Named settings of a table, and the escape hatch: `set` for any key, `table` for any
/// subtable, each as on [`Table`].
macro_rules! table_type {
    ($name:ident) => {
        impl $name {
            /// Sets `key` to `raw`, TOML text written as given.
            pub fn set(self, key: &str, raw: impl Display) -> Self {
                Self(self.0.set(key, raw))
            }

            /// Adds a subtable, or replaces it where it stands.
            pub fn table(self, name: &str, table: Table) -> Self {
                Self(self.0.table(name, table))
            }

            /// Sets `key` to the string `text`, escaped.
            fn string(self, key: &str, text: &str) -> Self {
                self.set(key, string(text))
            }
        }
    };
}

/// `[admin]`
#[derive(Clone, Debug)]
pub struct Admin(Table);
table_type!(Admin);

impl Admin {
    /// Listening on 127.0.0.1:0.
    pub fn new() -> Self {
        Self(Table::new()).listen("127.0.0.1:0")
    }
    /// `listen`
    pub fn listen(self, address: &str) -> Self {
        self.string("listen", address)
    }
    /// `max_connections`
    pub fn max_connections(self, n: i64) -> Self {
        self.set("max_connections", n)
    }
    /// `allow_from`, networks such as `"10.0.0.0/8"`.
    pub fn allow_from(self, networks: &[&str]) -> Self {
        self.set("allow_from", strings(networks))
    }
}

/// `[server]`
#[derive(Clone, Debug)]
pub struct Server(Table);
table_type!(Server);

impl Server {
    /// No settings yet.
    pub fn new() -> Self {
        Self(Table::new())
    }
    /// `shutdown_grace`, a duration such as `"20s"`.
    pub fn shutdown_grace(self, duration: &str) -> Self {
        self.string("shutdown_grace", duration)
    }
    /// `max_header_bytes`
    pub fn max_header_bytes(self, n: i64) -> Self {
        self.set("max_header_bytes", n)
    }
    /// `max_connections`
    pub fn max_connections(self, n: i64) -> Self {
        self.set("max_connections", n)
    }
    /// `body_idle_timeout`, a duration.
    pub fn body_idle_timeout(self, duration: &str) -> Self {
        self.string("body_idle_timeout", duration)
    }
    /// `replay_memory`, a size such as `"16MiB"`.
    pub fn replay_memory(self, size: &str) -> Self {
        self.string("replay_memory", size)
    }
}

/// `[log]`
#[derive(Clone, Debug)]
pub struct Log(Table);
table_type!(Log);

impl Log {
    /// No settings yet.
    pub fn new() -> Self {
        Self(Table::new())
    }
    /// `level`, a filter such as `"info"`.
    pub fn level(self, filter: &str) -> Self {
        self.string("level", filter)
    }
    /// `format`: `"text"` or `"json"`.
    pub fn format(self, format: &str) -> Self {
        self.string("format", format)
    }
    /// `access`
    pub fn access(self, on: bool) -> Self {
        self.set("access", on)
    }
}

/// One `[[upstream]]`, with its `[upstream.token]` and `[upstream.tls]`.
#[derive(Clone, Debug)]
pub struct Upstream(Table);
table_type!(Upstream);

impl Upstream {
    /// `name`, `listen` on 127.0.0.1:0 and `url`, in that order.
    pub fn new(name: &str, url: &str) -> Self {
        Self::named(name).listen("127.0.0.1:0").url(url)
    }
    /// Only `name`: the other keys come in the order they are set.
    pub fn named(name: &str) -> Self {
        Self(Table::new()).name(name)
    }
    /// `name`
    pub fn name(self, name: &str) -> Self {
        self.string("name", name)
    }
    /// `listen`
    pub fn listen(self, address: &str) -> Self {
        self.string("listen", address)
    }
    /// `url`
    pub fn url(self, url: &str) -> Self {
        self.string("url", url)
    }
    /// `allow_from`, networks such as `"10.0.0.0/8"`.
    pub fn allow_from(self, networks: &[&str]) -> Self {
        self.set("allow_from", strings(networks))
    }
    /// `allow_plain_http`
    pub fn allow_plain_http(self, allow: bool) -> Self {
        self.set("allow_plain_http", allow)
    }
    /// `connect_timeout`, a duration.
    pub fn connect_timeout(self, duration: &str) -> Self {
        self.string("connect_timeout", duration)
    }
    /// `response_header_timeout`, a duration.
    pub fn response_header_timeout(self, duration: &str) -> Self {
        self.string("response_header_timeout", duration)
    }
    /// `retry_on_401`
    pub fn retry_on_401(self, retry: bool) -> Self {
        self.set("retry_on_401", retry)
    }
    /// `[upstream.token]`
    pub fn token(self, token: Token) -> Self {
        self.table("token", token.0)
    }
    /// `[upstream.tls]`
    pub fn tls(self, tls: Tls) -> Self {
        self.table("tls", tls.0)
    }
}

/// `[upstream.token]`
#[derive(Clone, Debug)]
pub struct Token(Table);
table_type!(Token);

impl Token {
    /// `url` and `client_id`, in that order; no secret yet.
    pub fn new(url: &str, client_id: &str) -> Self {
        Self::empty().url(url).client_id(client_id)
    }
    /// No keys: they come in the order they are set.
    pub fn empty() -> Self {
        Self(Table::new())
    }
    /// `url`
    pub fn url(self, url: &str) -> Self {
        self.string("url", url)
    }
    /// `client_id`
    pub fn client_id(self, id: &str) -> Self {
        self.string("client_id", id)
    }
    /// `client_secret`, the secret itself.
    pub fn secret(self, secret: &str) -> Self {
        self.string("client_secret", secret)
    }
    /// `client_secret_file`
    pub fn secret_file(self, path: &str) -> Self {
        self.string("client_secret_file", path)
    }
    /// `client_secret_env`
    pub fn secret_env(self, variable: &str) -> Self {
        self.string("client_secret_env", variable)
    }
    /// `auth`: how the client authenticates, such as `"basic"` or `"post"`.
    pub fn auth(self, method: &str) -> Self {
        self.string("auth", method)
    }
    /// `scope`
    pub fn scope(self, scope: &str) -> Self {
        self.string("scope", scope)
    }
    /// `audience`
    pub fn audience(self, audience: &str) -> Self {
        self.string("audience", audience)
    }
    /// `resource`
    pub fn resource(self, resource: &str) -> Self {
        self.string("resource", resource)
    }
    /// `params`, an inline table of extra form fields.
    pub fn params(self, params: &[(&str, &str)]) -> Self {
        self.set("params", inline_table(params))
    }
    /// `timeout`, a duration.
    pub fn timeout(self, duration: &str) -> Self {
        self.string("timeout", duration)
    }
    /// `default_lifetime`, a duration.
    pub fn default_lifetime(self, duration: &str) -> Self {
        self.string("default_lifetime", duration)
    }
    /// `max_lifetime`, a duration.
    pub fn max_lifetime(self, duration: &str) -> Self {
        self.string("max_lifetime", duration)
    }
    /// `backoff_base`, a duration.
    pub fn backoff_base(self, duration: &str) -> Self {
        self.string("backoff_base", duration)
    }
    /// `backoff_cap`, a duration.
    pub fn backoff_cap(self, duration: &str) -> Self {
        self.string("backoff_cap", duration)
    }
    /// `allow_plain_http`
    pub fn allow_plain_http(self, allow: bool) -> Self {
        self.set("allow_plain_http", allow)
    }
}

/// `[upstream.tls]`
#[derive(Clone, Debug)]
pub struct Tls(Table);
table_type!(Tls);

impl Tls {
    /// No settings yet.
    pub fn new() -> Self {
        Self(Table::new())
    }
    /// `roots`: `"webpki"`, `"native"` or `"none"`.
    pub fn roots(self, roots: &str) -> Self {
        self.string("roots", roots)
    }
    /// `ca_file`
    pub fn ca_file(self, path: &str) -> Self {
        self.string("ca_file", path)
    }
}

/// One `[[listener]]`, with its `[[listener.route]]` tables in the order added.
#[derive(Clone, Debug)]
pub struct Listener(Table);
table_type!(Listener);

impl Listener {
    /// `listen` on 127.0.0.1:0 and `mode` (`"reverse"` or `"forward"`), in that order.
    pub fn new(mode: &str) -> Self {
        Self(Table::new()).listen("127.0.0.1:0").mode(mode)
    }
    /// `listen`
    pub fn listen(self, address: &str) -> Self {
        self.string("listen", address)
    }
    /// `mode`: `"reverse"` or `"forward"`.
    pub fn mode(self, mode: &str) -> Self {
        self.string("mode", mode)
    }
    /// `allow_from`, networks such as `"10.0.0.0/8"`.
    pub fn allow_from(self, networks: &[&str]) -> Self {
        self.set("allow_from", strings(networks))
    }
    /// Appends a `[[listener.route]]`.
    pub fn route(self, route: Route) -> Self {
        Self(self.0.array("route", route.0))
    }
}

/// One `[[listener.route]]`, with its `[listener.route.token]` and `[listener.route.tls]`.
#[derive(Clone, Debug)]
pub struct Route(Table);
table_type!(Route);

impl Route {
    /// Only `name`: the other keys come in the order they are set.
    pub fn named(name: &str) -> Self {
        Self(Table::new()).string("name", name)
    }
    /// `host`: exact, or `*.example.com` for one label.
    pub fn host(self, host: &str) -> Self {
        self.string("host", host)
    }
    /// `path_prefix`
    pub fn path_prefix(self, prefix: &str) -> Self {
        self.string("path_prefix", prefix)
    }
    /// `strip_prefix`
    pub fn strip_prefix(self, strip: bool) -> Self {
        self.set("strip_prefix", strip)
    }
    /// `url`
    pub fn url(self, url: &str) -> Self {
        self.string("url", url)
    }
    /// `allow_plain_http`
    pub fn allow_plain_http(self, allow: bool) -> Self {
        self.set("allow_plain_http", allow)
    }
    /// `connect_timeout`, a duration.
    pub fn connect_timeout(self, duration: &str) -> Self {
        self.string("connect_timeout", duration)
    }
    /// `response_header_timeout`, a duration.
    pub fn response_header_timeout(self, duration: &str) -> Self {
        self.string("response_header_timeout", duration)
    }
    /// `retry_on_401`
    pub fn retry_on_401(self, retry: bool) -> Self {
        self.set("retry_on_401", retry)
    }
    /// `[listener.route.token]`, as `[upstream.token]`.
    pub fn token(self, token: Token) -> Self {
        self.table("token", token.0)
    }
    /// `[listener.route.tls]`, as `[upstream.tls]`.
    pub fn tls(self, tls: Tls) -> Self {
        self.table("tls", tls.0)
    }
}
