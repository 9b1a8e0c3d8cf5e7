//! The keys each table of the file takes, read from the raw structs of `file.rs` themselves,
//! and the message for a key that is none of them: the nearest key ("did you mean"), or the
//! table a known key belongs to, and the keys of that table only.
//!
//! serde's own message lists the fields of the struct, and `[[upstream]]` and
//! `[[listener.route]]` share one: it offered `host` to an `[[upstream]]` and `listen` to a
//! route.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Visitor};

use super::file;

/// The keys only a `[[listener.route]]` takes: an `[[upstream]]` takes every request of its
/// own address.
const ROUTE_ONLY_KEYS: &[&str] = &["host", "path_prefix", "strip_prefix"];
/// The keys only an `[[upstream]]` takes: a route has its listener's.
const UPSTREAM_ONLY_KEYS: &[&str] = &["listen", "allow_from"];

/// A table of the file: where it stands (key names, array indices left out), how the file
/// writes its header, and its keys.
struct Table {
    path: &'static [&'static str],
    header: &'static str,
    keys: Vec<&'static str>,
}

/// Every table of the file.
fn tables() -> Vec<Table> {
    let upstream: Vec<&str> = keys_of::<file::Upstream>()
        .iter()
        .copied()
        .filter(|k| !ROUTE_ONLY_KEYS.contains(k))
        .collect();
    let route: Vec<&str> = keys_of::<file::Upstream>()
        .iter()
        .copied()
        .filter(|k| !UPSTREAM_ONLY_KEYS.contains(k))
        .collect();
    let token = keys_of::<file::Token>().to_vec();
    let tls = keys_of::<file::Tls>().to_vec();
    let jwt_bearer = keys_of::<file::JwtBearer>().to_vec();
    vec![
        Table {
            path: &[],
            header: "the top level",
            keys: keys_of::<file::File>().to_vec(),
        },
        Table {
            path: &["admin"],
            header: "[admin]",
            keys: keys_of::<file::Admin>().to_vec(),
        },
        Table {
            path: &["log"],
            header: "[log]",
            keys: keys_of::<file::Log>().to_vec(),
        },
        Table {
            path: &["server"],
            header: "[server]",
            keys: keys_of::<file::Server>().to_vec(),
        },
        Table {
            path: &["cache"],
            header: "[cache]",
            keys: keys_of::<file::Cache>().to_vec(),
        },
        Table {
            path: &["telemetry"],
            header: "[telemetry]",
            keys: keys_of::<file::Telemetry>().to_vec(),
        },
        Table {
            path: &["egress"],
            header: "[egress]",
            keys: keys_of::<file::Egress>().to_vec(),
        },
        Table {
            path: &["upstream"],
            header: "[[upstream]]",
            keys: upstream,
        },
        Table {
            path: &["upstream", "token"],
            header: "[upstream.token]",
            keys: token.clone(),
        },
        Table {
            path: &["upstream", "token", "jwt_bearer"],
            header: "[upstream.token.jwt_bearer]",
            keys: jwt_bearer.clone(),
        },
        Table {
            path: &["upstream", "tls"],
            header: "[upstream.tls]",
            keys: tls.clone(),
        },
        Table {
            path: &["listener"],
            header: "[[listener]]",
            keys: keys_of::<file::Listener>().to_vec(),
        },
        Table {
            path: &["listener", "route"],
            header: "[[listener.route]]",
            keys: route,
        },
        Table {
            path: &["listener", "route", "token"],
            header: "[listener.route.token]",
            keys: token,
        },
        Table {
            path: &["listener", "route", "token", "jwt_bearer"],
            header: "[listener.route.token.jwt_bearer]",
            keys: jwt_bearer,
        },
        Table {
            path: &["listener", "route", "tls"],
            header: "[listener.route.tls]",
            keys: tls,
        },
    ]
}

/// The message for the key at `path` (key names from the top, array indices left out) when
/// it is not a key of its table; `None` when it is one, or when its table takes any key
/// (`params`).
pub(super) fn unknown_key(path: &[&str]) -> Option<String> {
    let (&key, table_path) = path.split_last()?;
    let tables = tables();
    let table = tables.iter().find(|t| t.path == table_path)?;
    if table.keys.contains(&key) {
        return None;
    }
    let mut message = format!("unknown key `{key}`");
    // A key of a neighbouring table, most often one written below the header of its subtable.
    let elsewhere = tables.iter().find(|t| {
        t.path != table_path
            && !table_path.is_empty()
            && t.path.first() == table_path.first()
            && t.keys.contains(&key)
    });
    if let Some(other) = elsewhere {
        message.push_str(&format!(
            ": it belongs to {}, not to {} (in TOML a key belongs to the nearest header above it)",
            other.header, table.header
        ));
    } else if let Some(near) = nearest(key, &table.keys) {
        message.push_str(&format!("; did you mean `{near}`?"));
    }
    if !message.ends_with('?') {
        message.push('.');
    }
    let keys: Vec<String> = table.keys.iter().map(|k| format!("`{k}`")).collect();
    message.push_str(&format!(
        " The keys of {} are {}",
        table.header,
        keys.join(", ")
    ));
    Some(message)
}

/// The key of `keys` nearest to `typed`, if near enough to be what was meant: case and `-`
/// for `_` do not count, and a few slips are allowed (one in a short key, up to three in a
/// long one).
fn nearest<'k>(typed: &str, keys: &[&'k str]) -> Option<&'k str> {
    let normal = typed.to_ascii_lowercase().replace('-', "_");
    let allowed = (normal.chars().count() / 3).clamp(1, 3);
    keys.iter()
        .map(|key| (edit_distance(&normal, key), *key))
        .filter(|(distance, _)| *distance <= allowed)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, key)| key)
}

/// The optimal string alignment distance: insertions, deletions, substitutions, and swaps of
/// two neighbouring characters (the commonest typing slip), each counting one.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // rows[i][j]: the distance between the first i characters of a and the first j of b.
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

/// The field names a derived `Deserialize` struct asks for: it hands them to
/// `deserialize_struct`, which this deserializer records and then refuses.
fn keys_of<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    let fields = Cell::new(None);
    // The error is the point: nothing is deserialized, only the names are seen.
    let _ = T::deserialize(FieldNames { fields: &fields });
    fields.get().unwrap_or_default()
}

/// See [`keys_of`].
struct FieldNames<'a> {
    fields: &'a Cell<Option<&'static [&'static str]>>,
}

/// What [`FieldNames`] answers every request with.
#[derive(Debug)]
struct Refused;

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("only the field names are read")
    }
}

impl std::error::Error for Refused {}

impl de::Error for Refused {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Self
    }
}

impl<'de> Deserializer<'de> for FieldNames<'_> {
    type Error = Refused;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Refused> {
        Err(Refused)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Refused> {
        self.fields.set(Some(fields));
        Err(Refused)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_know_their_keys() {
        assert!(keys_of::<file::Token>().contains(&"client_secret_file"));
        let tables = tables();
        let upstream = tables.iter().find(|t| t.path == ["upstream"]).unwrap();
        assert!(upstream.keys.contains(&"listen") && !upstream.keys.contains(&"host"));
        let route = tables
            .iter()
            .find(|t| t.path == ["listener", "route"])
            .unwrap();
        assert!(route.keys.contains(&"host") && !route.keys.contains(&"listen"));
    }

    #[test]
    fn distances() {
        assert_eq!(edit_distance("scope", "scope"), 0);
        assert_eq!(edit_distance("scopes", "scope"), 1);
        assert_eq!(edit_distance("tiemout", "timeout"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn near_keys_only() {
        let keys = ["url", "client_id", "scope", "timeout"];
        assert_eq!(nearest("Client-ID", &keys), Some("client_id"));
        assert_eq!(nearest("scopes", &keys), Some("scope"));
        assert_eq!(nearest("uri", &keys), Some("url"));
        assert_eq!(nearest("audience", &keys), None);
    }

    #[test]
    fn known_keys_and_free_tables_are_not_unknown() {
        assert_eq!(unknown_key(&["upstream", "token", "url"]), None);
        assert_eq!(
            unknown_key(&["upstream", "token", "params", "anything"]),
            None
        );
        assert_eq!(unknown_key(&["upstream"]), None);
        assert_eq!(unknown_key(&[]), None);
    }
}
