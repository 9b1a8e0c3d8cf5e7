//! Single values of the file: addresses, networks, URLs, durations, sizes and counts.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use http::Uri;
use toml::Spanned;

use super::file::{DurationText, SizeText};
use super::validate::Validator;
use super::MAX_DURATION;

/// An IP address and port, such as `127.0.0.1:8081`.
pub(super) fn socket_addr(
    v: &mut Validator<'_>,
    value: &Spanned<String>,
    key: &str,
) -> Option<SocketAddr> {
    match value.get_ref().parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            v.problem(
                value.span(),
                key,
                format!(
                    "{:?} is not an IP address and port such as \"127.0.0.1:8081\"",
                    value.get_ref()
                ),
            );
            None
        }
    }
}

/// An absolute `http` or `https` URL without userinfo; plain `http` only to a loopback
/// host unless `allow_plain_http`, as the secret or the token would cross the network in
/// the clear.
pub(super) fn http_url(
    v: &mut Validator<'_>,
    value: &Spanned<String>,
    key: &str,
    allow_plain_http: bool,
) -> Option<Uri> {
    let text = value.get_ref();
    let authority = text.split_once("://").map_or("", |(_, rest)| {
        rest.split(['/', '?', '#']).next().unwrap_or("")
    });
    if authority.contains('@') {
        // Checked before anything quotes the URL: the userinfo is most likely a password.
        v.problem(
            value.span(),
            key,
            "must not hold a user name or password (user:pass@host): bearerd would print it; give credentials in [upstream.token]",
        );
        return None;
    }
    let uri = absolute_url(v, value, key)?;
    if uri.scheme_str() == Some("http") && !allow_plain_http && !is_loopback_host(uri.host()) {
        v.problem(
            value.span(),
            key,
            format!(
                "{text:?} is plain http to a host that is not loopback: credentials and tokens would cross the network in the clear. Use https, or set allow_plain_http = true in this table"
            ),
        );
        return None;
    }
    Some(uri)
}

/// The networks of an `allow_from` list: at least one, each a CIDR or a single address.
pub(super) fn networks(
    v: &mut Validator<'_>,
    list: &Spanned<Vec<Spanned<String>>>,
    key: &str,
) -> Vec<ipnet::IpNet> {
    if list.get_ref().is_empty() {
        v.problem(
            list.span(),
            key,
            "is empty, so no one could connect: list the networks that may, such as \"10.0.0.0/8\"",
        );
    }
    list.get_ref()
        .iter()
        .filter_map(|item| {
            let text = item.get_ref().trim();
            let parsed = text.parse::<ipnet::IpNet>().ok().or_else(|| {
                text.parse::<std::net::IpAddr>()
                    .ok()
                    .map(ipnet::IpNet::from)
            });
            if parsed.is_none() {
                v.problem(
                    item.span(),
                    key,
                    format!(
                        "{text:?} is not a network such as \"10.0.0.0/8\", \"fd00::/8\" or an address"
                    ),
                );
            }
            parsed
        })
        .collect()
}

/// An absolute `http` or `https` URL with a host and a valid port.
fn absolute_url(v: &mut Validator<'_>, value: &Spanned<String>, key: &str) -> Option<Uri> {
    let text = value.get_ref();
    let uri: Uri = match text.parse() {
        Ok(uri) => uri,
        Err(_) => {
            v.problem(
                value.span(),
                key,
                format!("{text:?} is not an absolute http or https URL"),
            );
            return None;
        }
    };
    // `http::Uri` accepts any digits as a port and then reports none; say so here.
    let port_text = uri
        .authority()
        .and_then(|a| a.as_str().rsplit_once(':'))
        .map(|(_, port)| port)
        .filter(|port| !port.contains(']'));
    if port_text.is_some_and(|port| port.parse::<u16>().is_err()) {
        v.problem(
            value.span(),
            key,
            format!("{text:?}: the port is not a number from 0 to 65535"),
        );
        return None;
    }
    match uri.scheme_str() {
        Some("http" | "https") if uri.authority().is_some() => Some(uri),
        Some("http" | "https") => {
            v.problem(value.span(), key, format!("{text:?} has no host"));
            None
        }
        Some(other) => {
            v.problem(
                value.span(),
                key,
                format!("{text:?}: scheme {other:?} is not http or https"),
            );
            None
        }
        None => {
            v.problem(
                value.span(),
                key,
                format!("{text:?} is not an absolute http or https URL"),
            );
            None
        }
    }
}

/// A whole number within `range`.
pub(super) fn count(
    v: &mut Validator<'_>,
    value: Option<&Spanned<i64>>,
    key: &str,
    default: usize,
    range: RangeInclusive<usize>,
) -> usize {
    let Some(value) = value else {
        return default;
    };
    match usize::try_from(*value.get_ref()) {
        Ok(n) if range.contains(&n) => n,
        _ => {
            let (min, max) = (range.start(), range.end());
            let message = if *max == usize::MAX {
                format!("must be a whole number of at least {min}")
            } else {
                format!("must be a whole number from {min} to {max}")
            };
            v.problem(value.span(), key, message);
            default
        }
    }
}

/// A duration (humantime: `10s`, `500ms`, `1h 30m`), longer than zero and at most
/// [`MAX_DURATION`]; `default` when not written, or wrong (with a problem).
pub(super) fn duration(
    v: &mut Validator<'_>,
    value: Option<&Spanned<DurationText>>,
    key: &str,
    default: Duration,
) -> Duration {
    let Some(value) = value else {
        return default;
    };
    let text = &value.get_ref().0;
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => {
            v.problem(value.span(), key, "must be longer than zero");
            default
        }
        Ok(d) if d > MAX_DURATION => {
            v.problem(value.span(), key, "must be at most a year (\"366d\")");
            default
        }
        Ok(d) => d,
        Err(e) => {
            v.problem(
                value.span(),
                key,
                format!("{text:?} is not a duration such as \"10s\" or \"2m\": {e}"),
            );
            default
        }
    }
}

/// A size (see [`parse_size`]); `default` when not written, or wrong (with a problem).
pub(super) fn size(
    v: &mut Validator<'_>,
    value: Option<&Spanned<SizeText>>,
    key: &str,
    default: usize,
) -> usize {
    let Some(value) = value else {
        return default;
    };
    let text = &value.get_ref().0;
    match parse_size(text) {
        Some(bytes) => bytes,
        None => {
            v.problem(
                value.span(),
                key,
                format!("{text:?} is not a size such as \"16MiB\", \"512KiB\" or \"0\""),
            );
            default
        }
    }
}

/// Whether `host` is `localhost` or a name below it (RFC 6761 §6.3), or a loopback address.
pub(crate) fn is_loopback_host(host: Option<&str>) -> bool {
    let Some(host) = host else {
        return false;
    };
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    name.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// A size such as `16MiB`, `512KiB`, `1GiB`, `4096B` or `4096`, in bytes.
fn parse_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: usize = number.parse().ok()?;
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MiB"), Some(16 << 20));
        assert_eq!(parse_size("512KiB"), Some(512 << 10));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("0"), Some(0));
        assert_eq!(parse_size("1 GiB"), Some(1 << 30));
        assert_eq!(parse_size("16MB"), None);
        assert_eq!(parse_size("MiB"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("99999999999999999999GiB"), None);
    }

    #[test]
    fn loopback_hosts() {
        for host in [
            "127.0.0.1",
            "127.8.9.10",
            "[::1]",
            "localhost",
            "LOCALHOST.",
            "api.localhost",
        ] {
            assert!(is_loopback_host(Some(host)), "{host}");
        }
        for host in [
            "10.0.0.1",
            "[::]",
            "0.0.0.0",
            "localhost.example.com",
            "example.com",
        ] {
            assert!(!is_loopback_host(Some(host)), "{host}");
        }
    }
}
