//! The documentation against the code: every config key the parser accepts is in the
//! configuration reference (`docs/configuration.md`) and in `config.example.toml`, and a
//! newcomer with only README.md finds the reference, a recipe for their IdP and the
//! Kubernetes overlay for their case, through links that resolve.
//!
//! The accepted keys are not a hand list: they are harvested from the parser itself. Every raw
//! table denies unknown keys, and serde's error for an unknown key lists the keys the table
//! expects; so a config holding one probe key in a table makes `Config::parse` name that
//! table's keys. A key that is itself a table (`token`, `route`) is found by probing inside it,
//! so a new key or a new table in `src/config/file.rs` shows up here without a change to this
//! file.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bearerd::config::{Config, ConfigError};

/// A key no table accepts, put in each table to make the parser list the keys it does accept.
const PROBE: &str = "zz_docs_probe_key";

/// The most lines the README may have: the door, not the house.
const README_MAX_LINES: usize = 260;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A table of the config file, as its header is written: `["upstream", "token"]` with the
/// array flags `[true, false]` is `[upstream.token]` inside an `[[upstream]]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Table {
    path: Vec<String>,
    /// Whether each part is an array of tables (`[[...]]`).
    arrays: Vec<bool>,
}

impl Table {
    fn root() -> Self {
        Table {
            path: Vec::new(),
            arrays: Vec::new(),
        }
    }

    fn child(&self, key: &str, array: bool) -> Self {
        let mut t = self.clone();
        t.path.push(key.to_owned());
        t.arrays.push(array);
        t
    }

    /// How the table's header is written: `[[listener.route]]`, `[upstream.token]`.
    fn header(&self) -> String {
        let dotted = self.path.join(".");
        if self.arrays.last().copied().unwrap_or(false) {
            format!("[[{dotted}]]")
        } else {
            format!("[{dotted}]")
        }
    }

    /// A config that opens this table and its parents (each with its own header) and puts
    /// `PROBE` first in it, so serde meets the unknown key before it can miss a required one.
    fn probe_config(&self) -> String {
        let mut text = String::new();
        for i in 1..=self.path.len() {
            let prefix = Table {
                path: self.path[..i].to_vec(),
                arrays: self.arrays[..i].to_vec(),
            };
            text.push_str(&prefix.header());
            text.push('\n');
        }
        text.push_str(PROBE);
        text.push_str(" = 1\n");
        text
    }
}

/// The keys the parser accepts in `table`, or `None` when `table` is not a table of keys
/// (a scalar, a map of free keys such as `params`, an enum).
fn accepted_keys(table: &Table) -> Option<BTreeSet<String>> {
    let text = table.probe_config();
    let message = match Config::parse(Path::new("probe.toml"), &text) {
        Ok(_) => return None,
        Err(ConfigError::Invalid { problems, .. }) => problems
            .into_iter()
            .map(|p| p.message)
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => panic!("{e}"),
    };
    // serde: "unknown field `zz_docs_probe_key`, expected one of `a`, `b`" (or "expected `a`"
    // for one key), whatever words a friendlier message may add around the list. An enum
    // says "unknown variant" instead, and a scalar or a map of free keys gives a type error.
    let at = message.find(&format!("`{PROBE}`"))?;
    if message.contains("variant") || message.contains("invalid type") {
        return None;
    }
    let rest = &message[at + PROBE.len() + 2..];
    let keys: BTreeSet<String> = backticked(rest)
        .into_iter()
        .filter(|k| k != PROBE && is_key(k))
        .collect();
    assert!(
        !keys.is_empty(),
        "the parser's answer to an unknown key in {} no longer lists the keys it expects, so \
         this test cannot find them; config:\n{text}\nanswer: {message}",
        table.header()
    );
    Some(keys)
}

fn is_key(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Every `text` between backticks.
fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// Every table of the config file with the keys it accepts, found from the top down: a key is
/// a sub-table when a probe inside it, as `[a.key]` or as `[[a.key]]`, is answered with a list
/// of expected keys.
fn config_tables() -> BTreeMap<Table, BTreeSet<String>> {
    let mut tables = BTreeMap::new();
    let mut todo = vec![Table::root()];
    while let Some(table) = todo.pop() {
        let keys = accepted_keys(&table)
            .unwrap_or_else(|| panic!("{} takes no keys of its own?", table.header()));
        for key in &keys {
            for array in [false, true] {
                let child = table.child(key, array);
                if accepted_keys(&child).is_some() {
                    todo.push(child);
                    break;
                }
            }
        }
        tables.insert(table, keys);
    }
    tables
}

/// Keys that are sub-tables are documented by their own section, not as keys.
fn leaf_keys(
    tables: &BTreeMap<Table, BTreeSet<String>>,
    table: &Table,
    keys: &BTreeSet<String>,
) -> BTreeSet<String> {
    keys.iter()
        .filter(|k| {
            !tables.contains_key(&table.child(k, false))
                && !tables.contains_key(&table.child(k, true))
        })
        .cloned()
        .collect()
}

/// The sections of a Markdown text by heading line, code blocks kept out of the headings.
struct Markdown {
    /// (heading level, heading text, body up to the next heading of any level).
    sections: Vec<(usize, String, String)>,
}

impl Markdown {
    fn parse(text: &str) -> Self {
        let mut sections = vec![(0, String::new(), String::new())];
        let mut fenced = false;
        for line in text.lines() {
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
            }
            let level = line.chars().take_while(|&c| c == '#').count();
            if !fenced && level > 0 && line[level..].starts_with(' ') {
                sections.push((level, line[level..].trim().to_owned(), String::new()));
            } else if let Some(last) = sections.last_mut() {
                last.2.push_str(line);
                last.2.push('\n');
            }
        }
        Markdown { sections }
    }

    /// GitHub's anchors of every heading (`-1`, `-2` after repeats).
    fn anchors(&self) -> BTreeSet<String> {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut anchors = BTreeSet::new();
        for (level, heading, _) in &self.sections {
            if *level == 0 {
                continue;
            }
            let slug = slug(heading);
            let n = seen.entry(slug.clone()).or_insert(0);
            anchors.insert(if *n == 0 {
                slug.clone()
            } else {
                format!("{slug}-{n}")
            });
            *n += 1;
        }
        anchors
    }

    /// The text of the section whose heading holds `marker` (in backticks), with its
    /// sub-sections.
    fn section_with(&self, marker: &str) -> Option<String> {
        let wanted = format!("`{marker}`");
        let start = self
            .sections
            .iter()
            .position(|(level, h, _)| *level > 0 && h.contains(&wanted))?;
        let level = self.sections[start].0;
        let mut text = self.sections[start].2.clone();
        for (l, h, body) in &self.sections[start + 1..] {
            if *l <= level {
                break;
            }
            text.push_str(h);
            text.push('\n');
            text.push_str(body);
        }
        Some(text)
    }
}

/// GitHub's anchor for a heading: lower case, spaces to `-`, other punctuation dropped.
fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The section of docs/configuration.md that documents `table`: a route's token and TLS tables
/// are the same as an upstream's and are documented once, there.
fn doc_section_for(table: &Table) -> String {
    let header = table.header();
    match header.as_str() {
        "[listener.route.token]" => "[upstream.token]".to_owned(),
        "[listener.route.tls]" => "[upstream.tls]".to_owned(),
        "[listener.route.token.jwt_bearer]" => "[upstream.token.jwt_bearer]".to_owned(),
        _ => header,
    }
}

#[test]
fn every_key_the_parser_accepts_is_in_the_configuration_reference() {
    let tables = config_tables();
    // The harvest itself is checked against what is known to exist, so that a parser whose
    // messages changed cannot make this test pass by finding nothing.
    for (header, key) in [
        ("[admin]", "listen"),
        ("[[upstream]]", "url"),
        ("[upstream.token]", "client_secret_file"),
        ("[upstream.tls]", "ca_file"),
        ("[[listener]]", "mode"),
        ("[[listener.route]]", "path_prefix"),
        ("[listener.route.token]", "dpop"),
        ("[cache]", "key_file"),
    ] {
        let found = tables.iter().find(|(t, _)| t.header() == header);
        assert!(
            found.is_some_and(|(_, keys)| keys.contains(key)),
            "the harvest missed {header} {key}: {tables:?}"
        );
    }

    let path = root().join("docs/configuration.md");
    let doc = Markdown::parse(&read(&path));
    let mut missing = Vec::new();
    for (table, keys) in &tables {
        if table.path.is_empty() {
            continue;
        }
        let section = doc_section_for(table);
        let Some(text) = doc.section_with(&section) else {
            missing.push(format!("no section with `{section}` in its heading"));
            continue;
        };
        let documented: BTreeSet<String> = backticked(&text).into_iter().collect();
        for key in leaf_keys(&tables, table, keys) {
            if !documented.contains(&key) {
                missing.push(format!("{} `{key}`", table.header()));
            }
        }
        // And the other way: a key in the first column of the section's tables that the
        // parser does not accept is stale (checked once, for the table the section is named by).
        let own = section == table.header();
        for row in text.lines().filter(|l| own && l.starts_with("| `")) {
            let first = row.split('|').nth(1).unwrap_or("");
            for key in backticked(first) {
                if is_key(&key) && !keys.contains(&key) {
                    missing.push(format!(
                        "{} documents `{key}`, which the parser does not accept",
                        table.header()
                    ));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} is not in step with the parser (src/config/file.rs):\n{}",
        path.display(),
        missing.join("\n")
    );
}

/// The keys set (or shown commented out) under each table header of a TOML text, commented
/// headers (`# [cache]`) included.
fn example_keys(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut sections: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim_start_matches(['#', ' ']).trim_end();
        if line.starts_with('[') {
            let header = line.split_whitespace().next().unwrap_or("");
            if header.ends_with(']') {
                current = header.to_owned();
                sections.entry(current.clone()).or_default();
                continue;
            }
        }
        if let Some((key, _)) = line.split_once('=') {
            let key = key.trim();
            if is_key(key) {
                sections
                    .entry(current.clone())
                    .or_default()
                    .insert(key.to_owned());
            }
        }
    }
    sections
}

#[test]
fn every_key_the_parser_accepts_is_in_the_example_config() {
    let tables = config_tables();
    let path = root().join("config.example.toml");
    let example = example_keys(&read(&path));
    let mut missing = Vec::new();
    for (table, keys) in &tables {
        if table.path.is_empty() {
            continue;
        }
        // An upstream and a route are one raw table today: a key shown in either is shown.
        // (A route-only key such as `host` belongs with the routes, not in `[[upstream]]`.)
        let same: &[&str] = match table.header().as_str() {
            "[[upstream]]" | "[[listener.route]]" => &["[[upstream]]", "[[listener.route]]"],
            "[upstream.token]" | "[listener.route.token]" => {
                &["[upstream.token]", "[listener.route.token]"]
            }
            "[upstream.tls]" | "[listener.route.tls]" => {
                &["[upstream.tls]", "[listener.route.tls]"]
            }
            "[upstream.token.jwt_bearer]" | "[listener.route.token.jwt_bearer]" => &[
                "[upstream.token.jwt_bearer]",
                "[listener.route.token.jwt_bearer]",
            ],
            _ => &[],
        };
        let header = table.header();
        let shown: BTreeSet<&String> = example
            .iter()
            .filter(|(h, _)| **h == header || same.contains(&h.as_str()))
            .flat_map(|(_, k)| k)
            .collect();
        if !example.contains_key(&header) {
            missing.push(format!("no {header} table, set or commented out"));
        }
        for key in leaf_keys(&tables, table, keys) {
            if !shown.contains(&key) {
                missing.push(format!("{header} `{key}`"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} lacks keys the parser accepts (set them, or show them commented out):\n{}",
        path.display(),
        missing.join("\n")
    );
}

/// Every relative link target in a Markdown text, code blocks and inline code left out.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let prose: String = line.split('`').step_by(2).collect::<Vec<_>>().join("");
        let mut rest = prose.as_str();
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            let end = rest.find(')').unwrap_or(rest.len());
            let target = rest[..end].trim();
            if !target.contains("://") && !target.starts_with("mailto:") {
                out.push(target.to_owned());
            }
            rest = &rest[end..];
        }
    }
    out
}

/// Checks every relative link of the Markdown file `from`: its file exists, and its anchor is a
/// heading of it.
fn broken_links(from: &Path) -> Vec<String> {
    let text = read(from);
    let dir = from.parent().unwrap_or(Path::new(""));
    let mut broken = Vec::new();
    for target in links(&text) {
        let (file, anchor) = match target.split_once('#') {
            Some((f, a)) => (f, Some(a)),
            None => (target.as_str(), None),
        };
        let file = if file.is_empty() {
            from.to_owned()
        } else {
            dir.join(file)
        };
        if !file.exists() {
            broken.push(format!("{}: {target}: no such file", from.display()));
            continue;
        }
        if let Some(anchor) = anchor {
            let anchors = Markdown::parse(&read(&file)).anchors();
            if !anchors.contains(anchor) {
                broken.push(format!("{}: {target}: no such heading", from.display()));
            }
        }
    }
    broken
}

fn readme() -> String {
    read(&root().join("README.md"))
}

#[test]
fn every_link_of_the_readme_and_the_docs_resolves() {
    let mut files = vec![root().join("README.md"), root().join("CONTRIBUTING.md")];
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    let broken: Vec<String> = files.iter().flat_map(|f| broken_links(f)).collect();
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_readme_is_the_door_not_the_house() {
    let lines = readme().lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines; at most {README_MAX_LINES}: move the detail into docs/"
    );
}

/// From the README alone, a newcomer finds the reference page for a key.
#[test]
fn a_newcomer_finds_the_configuration_reference_from_the_readme() {
    let targets = links(&readme());
    assert!(
        targets
            .iter()
            .any(|t| t.split('#').next() == Some("docs/configuration.md")),
        "README.md does not link to docs/configuration.md: {targets:?}"
    );
    // And the reference itself covers every table header a newcomer may meet.
    let doc = read(&root().join("docs/configuration.md"));
    for table in config_tables().keys().filter(|t| !t.path.is_empty()) {
        assert!(
            doc.contains(&format!("`{}`", table.header())),
            "docs/configuration.md never names `{}`",
            table.header()
        );
    }
}

/// From the README alone, a newcomer finds the recipe for their IdP: each recipe of
/// docs/vendors.md (a heading followed by a `<!-- recipe... -->` marker) is linked to by its
/// anchor.
#[test]
fn a_newcomer_finds_a_recipe_for_each_vendor_from_the_readme() {
    let vendors = read(&root().join("docs/vendors.md"));
    let doc = Markdown::parse(&vendors);
    let mut recipes = BTreeSet::new();
    for (level, heading, body) in &doc.sections {
        if *level > 0 && body.lines().any(|l| l.starts_with("<!-- recipe")) {
            recipes.insert(slug(heading));
        }
    }
    assert!(
        recipes.len() >= 5,
        "docs/vendors.md should hold the recipes marked <!-- recipe: NAME -->: {recipes:?}"
    );
    let targets: BTreeSet<String> = links(&readme()).into_iter().collect();
    let unlinked: Vec<&String> = recipes
        .iter()
        .filter(|a| !targets.contains(&format!("docs/vendors.md#{a}")))
        .collect();
    assert!(
        unlinked.is_empty(),
        "README.md does not link to these recipes of docs/vendors.md: {unlinked:?}"
    );
}

/// From the README alone, a newcomer finds the Kubernetes page, and it describes every overlay
/// that exists under deploy/kubernetes.
#[test]
fn a_newcomer_finds_every_kubernetes_overlay_from_the_readme() {
    let targets = links(&readme());
    assert!(
        targets
            .iter()
            .any(|t| t.split('#').next() == Some("docs/kubernetes.md")),
        "README.md does not link to docs/kubernetes.md"
    );
    let page = read(&root().join("docs/kubernetes.md"));
    let mut overlays = Vec::new();
    for entry in std::fs::read_dir(root().join("deploy/kubernetes")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            overlays.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    assert!(overlays.len() >= 2, "deploy/kubernetes: {overlays:?}");
    let absent: Vec<&String> = overlays
        .iter()
        .filter(|o| !page.contains(&format!("deploy/kubernetes/{o}")))
        .collect();
    assert!(
        absent.is_empty(),
        "docs/kubernetes.md does not describe these directories of deploy/kubernetes: {absent:?}"
    );
}

/// The configs a newcomer copies from the README are valid as they stand.
#[test]
fn every_toml_block_of_the_readme_is_a_valid_config() {
    let readme = readme();
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match current.as_mut() {
            None if line.trim_start() == "```toml" => current = Some(String::new()),
            Some(block) if line.trim_start() == "```" => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    assert!(!blocks.is_empty(), "README.md shows no config");
    for block in blocks {
        if let Err(e) = Config::parse(Path::new("README.md"), &block) {
            panic!("a config in README.md does not load:\n{block}\n{e}");
        }
    }
}
