//! `[egress]`: the HTTP proxy bearerd's own calls go through, checked here; the tunnel itself
//! is `crate::egress`.
//!
//! Only `http://` proxies: bearerd talks to the proxy in clear (`CONNECT host:port`), and TLS
//! to the real host runs inside the tunnel. An `https://` proxy (TLS to the proxy too) or a
//! SOCKS one would need another handshake bearerd does not have, so either is a config error
//! rather than a proxy silently not used. The proxy URL holds no credentials: they belong in
//! `proxy_authorization_file`, a secret bearerd never prints.

use std::fmt;

use http::Uri;
use toml::Spanned;

use super::file;
use super::validate::Validator;
use super::Egress;

/// Where the proxy comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum EgressProxy {
    /// `proxy = "http://host:port"`: `scheme://host:port` only.
    Fixed(Uri),
    /// `use_env = true`: `HTTPS_PROXY`, `HTTP_PROXY` (and `ALL_PROXY`) as read at start.
    Environment(ProxyEnv),
}

impl fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(uri) => write!(f, "Fixed({uri})"),
            Self::Environment(env) => write!(f, "Environment({env:?})"),
        }
    }
}

/// The proxy variables of the environment, as curl reads them (upper case first). The values
/// may hold `user:password@`, so they are never printed whole: `Debug` shows the proxies'
/// authorities only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ProxyEnv {
    /// `HTTPS_PROXY` / `https_proxy`: for `https` targets.
    pub https: String,
    /// `HTTP_PROXY` / `http_proxy`: for `http` targets.
    pub http: String,
    /// `ALL_PROXY` / `all_proxy`: for either, when the one above is unset.
    pub all: String,
    /// `NO_PROXY` / `no_proxy`.
    pub no: String,
}

impl fmt::Debug for ProxyEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyEnv")
            .field("https", &without_credentials(&self.https))
            .field("http", &without_credentials(&self.http))
            .field("all", &without_credentials(&self.all))
            .field("no", &self.no)
            .finish()
    }
}

/// The proxy variables, read through `lookup` (the process environment, or a test's map).
pub fn proxy_env(lookup: &dyn Fn(&str) -> Option<String>) -> ProxyEnv {
    let first = |names: [&str; 2]| {
        names
            .iter()
            .find_map(|name| lookup(name).filter(|v| !v.trim().is_empty()))
            .unwrap_or_default()
    };
    ProxyEnv {
        https: first(["HTTPS_PROXY", "https_proxy"]),
        http: first(["HTTP_PROXY", "http_proxy"]),
        all: first(["ALL_PROXY", "all_proxy"]),
        no: first(["NO_PROXY", "no_proxy"]),
    }
}

impl ProxyEnv {
    /// The variables that name a proxy, with their values.
    pub fn proxies(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("HTTPS_PROXY", self.https.as_str()),
            ("HTTP_PROXY", self.http.as_str()),
            ("ALL_PROXY", self.all.as_str()),
        ]
        .into_iter()
        .filter(|(_, value)| !value.is_empty())
    }
}

/// `value` with any `user:password@` taken out, for messages.
pub fn without_credentials(value: &str) -> String {
    match value.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let (authority, path) = rest.split_at(authority_end);
            let host = authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host);
            format!("{scheme}://{host}{path}")
        }
        None => value
            .rsplit_once('@')
            .map_or_else(|| value.to_owned(), |(_, host)| host.to_owned()),
    }
}

/// Why `value` cannot be bearerd's proxy, if it cannot. `allow_credentials`: the environment's
/// `user:password@` is taken (it is where curl and others read it); the config file's is not.
fn proxy_problem(value: &str, allow_credentials: bool) -> Option<String> {
    let shown = without_credentials(value);
    let scheme = value.split_once("://").map(|(scheme, _)| scheme);
    match scheme.map(str::to_ascii_lowercase).as_deref() {
        Some("http") => {}
        // curl and hyper-util take a value without a scheme as http.
        None if allow_credentials => {}
        Some("https") => {
            return Some(format!(
                "{shown:?}: https:// proxies are not supported; bearerd speaks to the proxy in plain HTTP (CONNECT) and TLS to the real host runs inside the tunnel: use http://host:port"
            ))
        }
        Some(s) if s.starts_with("socks") => {
            return Some(format!(
                "{shown:?}: SOCKS proxies are not supported; only http:// proxies (HTTP CONNECT)"
            ))
        }
        _ => return Some(format!("{shown:?} is not an http://host:port URL")),
    }
    let Ok(uri) = value.parse::<Uri>() else {
        return Some(format!("{shown:?} is not an http://host:port URL"));
    };
    let Some(authority) = uri.authority() else {
        return Some(format!("{shown:?} names no host"));
    };
    if authority.as_str().contains('@') && !allow_credentials {
        return Some(format!(
            "{shown:?} must not hold a user name or password: bearerd would print it; use proxy_authorization_file"
        ));
    }
    if authority.host().is_empty() {
        return Some(format!("{shown:?} names no host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Some(format!(
            "{shown:?} must be http://host:port, without a path or query"
        ));
    }
    None
}

/// Whether `entry` is something hyper-util's `NO_PROXY` matcher takes: `*`, an address or
/// network, or a host name (a leading dot, or none: the name and every name under it).
fn no_proxy_problem(entry: &str) -> Option<String> {
    if entry == "*"
        || entry.parse::<ipnet::IpNet>().is_ok()
        || entry.parse::<std::net::IpAddr>().is_ok()
    {
        return None;
    }
    let name = entry.strip_prefix('.').unwrap_or(entry);
    let label_ok = |label: &str| {
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.split('.').all(label_ok) {
        None
    } else {
        Some(format!(
            "{entry:?} is not a host suffix such as \".svc.cluster.local\", an address, or a network such as \"10.0.0.0/8\" (no ports, schemes or wildcards but a lone \"*\")"
        ))
    }
}

impl Validator<'_> {
    /// `[egress]`: a proxy from the file or from the environment (not both), the hosts it is
    /// not used for, and its credentials' file.
    pub(super) fn egress(
        &mut self,
        spanned: &Spanned<file::Egress>,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Option<Egress> {
        let raw = spanned.get_ref();
        let use_env = raw.use_env.as_ref().is_some_and(|u| *u.get_ref());
        let proxy = match (&raw.proxy, use_env) {
            (Some(proxy), true) => {
                self.problem(
                    proxy.span(),
                    "egress.proxy",
                    "conflicts with use_env = true: take the proxy from the environment or name it here, not both",
                );
                None
            }
            (Some(proxy), false) => match proxy_problem(proxy.get_ref(), false) {
                Some(problem) => {
                    self.problem(proxy.span(), "egress.proxy", problem);
                    None
                }
                // Checked above: it parses, with no path beyond "/".
                None => proxy
                    .get_ref()
                    .trim_end_matches('/')
                    .parse::<Uri>()
                    .ok()
                    .map(EgressProxy::Fixed),
            },
            (None, true) => {
                let env = proxy_env(lookup);
                let span = raw
                    .use_env
                    .as_ref()
                    .map_or_else(|| spanned.span(), Spanned::span);
                let mut ok = true;
                for (name, value) in env.proxies() {
                    if let Some(problem) = proxy_problem(value, true) {
                        self.problem(
                            span.clone(),
                            "egress.use_env",
                            format!("the environment's {name}: {problem}"),
                        );
                        ok = false;
                    }
                }
                ok.then_some(EgressProxy::Environment(env))
            }
            (None, false) => {
                self.problem(
                    spanned.span(),
                    "egress.proxy",
                    "missing: [egress] needs proxy = \"http://host:port\", or use_env = true to take HTTPS_PROXY and HTTP_PROXY from the environment",
                );
                None
            }
        };
        let mut no_proxy = Vec::new();
        for entry in raw.no_proxy.iter().flat_map(|list| list.get_ref()) {
            let text = entry.get_ref().trim();
            match no_proxy_problem(text) {
                Some(problem) => self.problem(entry.span(), "egress.no_proxy", problem),
                None => no_proxy.push(text.to_owned()),
            }
        }
        Some(Egress {
            proxy: proxy?,
            no_proxy,
            authorization_file: raw
                .proxy_authorization_file
                .as_ref()
                .map(|p| self.base_dir.join(p.get_ref())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_proxies_without_credentials_are_taken() {
        assert_eq!(proxy_problem("http://proxy.corp:3128", false), None);
        assert_eq!(proxy_problem("http://10.0.0.1:3128/", false), None);
        let https = proxy_problem("https://proxy.corp:3128", false).unwrap();
        assert!(
            https.contains("https:// proxies are not supported"),
            "{https}"
        );
        let socks = proxy_problem("socks5://proxy.corp:1080", true).unwrap();
        assert!(socks.contains("SOCKS proxies are not supported"), "{socks}");
        let secret = proxy_problem("http://user:hunter2@proxy.corp:3128", false).unwrap();
        assert!(secret.contains("proxy_authorization_file"), "{secret}");
        assert!(!secret.contains("hunter2"), "{secret}");
        assert_eq!(proxy_problem("http://user:hunter2@proxy:3128", true), None);
        assert_eq!(proxy_problem("proxy.corp:3128", true), None, "as curl");
        assert!(proxy_problem("proxy.corp:3128", false).is_some());
        assert!(proxy_problem("http://proxy.corp:3128/path", false).is_some());
    }

    #[test]
    fn no_proxy_takes_suffixes_addresses_and_networks() {
        for good in [
            ".svc.cluster.local",
            "example.com",
            "10.0.0.0/8",
            "::1",
            "fd00::/8",
            "*",
            "127.0.0.1",
        ] {
            assert_eq!(no_proxy_problem(good), None, "{good}");
        }
        for bad in [
            "*.example.com",
            "http://example.com",
            "host:443",
            "",
            "a..b",
        ] {
            assert!(no_proxy_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn the_environment_is_read_as_curl_does_and_printed_without_credentials() {
        let env = proxy_env(&|name| match name {
            "HTTPS_PROXY" => Some("http://alice:s3cret@proxy:3128".into()),
            "http_proxy" => Some("http://proxy:3128".into()),
            "NO_PROXY" => Some(".internal".into()),
            _ => None,
        });
        assert_eq!(env.http, "http://proxy:3128");
        assert_eq!(env.no, ".internal");
        let debug = format!("{env:?}");
        assert!(debug.contains("proxy:3128"), "{debug}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert_eq!(env.proxies().count(), 2);
    }
}
