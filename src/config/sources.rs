//! The config's sources: the `--config` file and every `*.toml` of the `conf.d/` directory
//! beside it, merged into one TOML document before the validator reads it.
//!
//! Kustomize cannot merge TOML, so each Kubernetes component adds a file of its own to
//! `conf.d/` (docs/kubernetes.md). The merge is plain: tables merge key by key, arrays of
//! tables (`[[upstream]]`, `[[listener]]`) are appended in file order, and any other key set
//! in two files is an error naming both places: nothing is overridden silently.
//!
//! Every file keeps its own line and column in messages: the files are laid out one after
//! the other in a single offset space (as a compiler's source map does), each file's spans
//! shifted by where it starts, so a span says both the file and the place in it.

use std::borrow::Cow;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeArray, DeTable, DeValue};
use toml::Spanned;

use super::ConfigError;

/// The directory beside the main file whose `*.toml` files are merged into it.
pub const CONF_D: &str = "conf.d";

/// One file read.
#[derive(Debug)]
struct Source {
    path: PathBuf,
    text: String,
    /// Where its text starts in the shared offset space.
    start: usize,
}

/// The files of one config, main file first, then `conf.d/*.toml` by name.
#[derive(Debug)]
pub(super) struct Sources {
    files: Vec<Source>,
}

/// A place in one of the files.
pub(super) struct Place<'a> {
    /// The file's index in [`Sources`] (0: the main file).
    pub(super) index: usize,
    /// Its path.
    pub(super) path: &'a Path,
    /// 1-based line.
    pub(super) line: usize,
    /// 1-based column, in characters.
    pub(super) column: usize,
}

impl std::fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.path.display(), self.line, self.column)
    }
}

/// A problem the merge found: where, the key, and what.
pub(super) struct MergeProblem {
    /// Where (the later file, for a key set twice).
    pub(super) span: Range<usize>,
    /// The dotted key.
    pub(super) key: String,
    /// What is wrong; `None` for a key set twice.
    pub(super) message: Option<String>,
    /// For a key set twice: where it was set first.
    pub(super) first: Option<usize>,
}

impl Sources {
    /// The main file's text, and the `conf.d/*.toml` files beside `path` (none when the
    /// directory does not exist). Names starting with `.` are skipped: a Kubernetes
    /// ConfigMap volume keeps its real files in `..data/`, and links them by their names.
    pub(super) fn read(path: &Path) -> Result<Self, ConfigError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })
        };
        let mut files = vec![(path.to_owned(), read(path)?)];
        let dir = path.parent().unwrap_or(Path::new("")).join(CONF_D);
        for extra in conf_d_files(&dir)? {
            let text = read(&extra)?;
            files.push((extra, text));
        }
        Ok(Self::new(files))
    }

    /// Sources from texts already read, the main file first.
    pub(super) fn new(files: Vec<(PathBuf, String)>) -> Self {
        let mut start = 0;
        let files = files
            .into_iter()
            .map(|(path, text)| {
                let source = Source { path, text, start };
                // One more, so that an offset at a file's very end still belongs to it.
                start += source.text.len() + 1;
                source
            })
            .collect();
        Self { files }
    }

    /// The main file's path.
    pub(super) fn main_path(&self) -> &Path {
        self.files.first().map_or(Path::new(""), |f| &f.path)
    }

    /// The `conf.d` files read, in merge order.
    pub(super) fn extra_paths(&self) -> Vec<PathBuf> {
        self.files.iter().skip(1).map(|f| f.path.clone()).collect()
    }

    /// The file and line:column of an offset of the shared space.
    pub(super) fn place(&self, offset: usize) -> Place<'_> {
        let index = self
            .files
            .iter()
            .rposition(|f| f.start <= offset)
            .unwrap_or(0);
        let (path, text, local) = match self.files.get(index) {
            Some(f) => (f.path.as_path(), f.text.as_str(), offset - f.start),
            None => (Path::new(""), "", 0),
        };
        let (line, column) = line_and_column(text, local);
        Place {
            index,
            path,
            line,
            column,
        }
    }

    /// Every file parsed and merged into one document. A syntax error stops at its file
    /// (`Err` with the span and message); keys set twice are reported in `problems` and the
    /// later value is dropped.
    pub(super) fn merged(
        &self,
        problems: &mut Vec<MergeProblem>,
    ) -> Result<Spanned<DeTable<'_>>, MergeProblem> {
        let mut merged: Option<Spanned<DeTable<'_>>> = None;
        for file in &self.files {
            let table = DeTable::parse(&file.text).map_err(|e| MergeProblem {
                span: shift_range(e.span().unwrap_or(0..0), file.start),
                key: "(syntax)".into(),
                message: Some(e.message().to_owned()),
                first: None,
            })?;
            let table = shift_table(table, file.start);
            merged = Some(match merged {
                None => table,
                Some(mut into) => {
                    merge_tables(into.get_mut(), table.into_inner(), "", problems);
                    into
                }
            });
        }
        Ok(merged.unwrap_or_else(|| Spanned::new(0..0, DeTable::new())))
    }
}

/// The `*.toml` files of `dir` by name, skipping hidden names; none when `dir` is missing.
fn conf_d_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ConfigError::Read {
                path: dir.to_owned(),
                source,
            })
        }
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ConfigError::Read {
            path: dir.to_owned(),
            source,
        })?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with('.') && name.ends_with(".toml") {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Merges `from` into `into`: tables key by key, arrays of tables appended; anything else
/// present in both is a problem at the later place, naming the first.
fn merge_tables<'i>(
    into: &mut DeTable<'i>,
    from: DeTable<'i>,
    prefix: &str,
    problems: &mut Vec<MergeProblem>,
) {
    for (key, value) in from {
        let path = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        let Some(existing) = into.get_mut(key.get_ref().as_ref() as &str) else {
            into.insert(key, value);
            continue;
        };
        let first = existing.span();
        let later = value.span();
        match (existing.get_mut(), value.into_inner()) {
            (DeValue::Table(a), DeValue::Table(b)) => merge_tables(a, b, &path, problems),
            (DeValue::Array(a), DeValue::Array(b)) if all_tables(a) && all_tables(&b) => {
                let mut joined = DeArray::new();
                for item in a.iter().chain(b.iter()) {
                    joined.push(item.clone());
                }
                *a = joined;
            }
            _ => problems.push(MergeProblem {
                span: later,
                key: path,
                message: None,
                first: Some(first.start),
            }),
        }
    }
}

/// Whether an array holds tables only (`[[upstream]]`), which files may add to.
fn all_tables(array: &DeArray<'_>) -> bool {
    !array.is_empty()
        && array
            .iter()
            .all(|v| matches!(v.get_ref(), DeValue::Table(_)))
}

/// `range` moved `by` bytes.
fn shift_range(range: Range<usize>, by: usize) -> Range<usize> {
    range.start + by..range.end + by
}

/// A parsed file's spans moved to where the file starts in the shared offset space.
fn shift_table(table: Spanned<DeTable<'_>>, by: usize) -> Spanned<DeTable<'_>> {
    let span = shift_range(table.span(), by);
    Spanned::new(span, shift_entries(table.into_inner(), by))
}

/// A table's keys and values moved `by` bytes, all the way down.
fn shift_entries(table: DeTable<'_>, by: usize) -> DeTable<'_> {
    let mut shifted = DeTable::new();
    for (key, value) in table {
        let key_span = shift_range(key.span(), by);
        let key: Cow<'_, str> = key.into_inner();
        shifted.insert(Spanned::new(key_span, key), shift_value(value, by));
    }
    shifted
}

/// A value moved `by` bytes, all the way down.
fn shift_value(value: Spanned<DeValue<'_>>, by: usize) -> Spanned<DeValue<'_>> {
    let span = shift_range(value.span(), by);
    let inner = match value.into_inner() {
        DeValue::Table(table) => DeValue::Table(shift_entries(table, by)),
        DeValue::Array(array) => {
            let mut shifted = DeArray::new();
            for item in array.iter() {
                shifted.push(shift_value(item.clone(), by));
            }
            DeValue::Array(shifted)
        }
        other => other,
    };
    Spanned::new(span, inner)
}

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_count_from_one() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_and_column(text, 0), (1, 1));
        assert_eq!(line_and_column(text, 6), (2, 1));
        assert_eq!(line_and_column(text, text.find('=').unwrap()), (1, 3));
        assert_eq!(line_and_column(text, text.rfind('=').unwrap()), (2, 4));
        assert_eq!(line_and_column(text, 1000), (3, 1));
    }

    #[test]
    fn offsets_map_back_to_their_file() {
        let sources = Sources::new(vec![
            ("/a.toml".into(), "x = 1\n".into()),
            ("/conf.d/b.toml".into(), "y = 2\nz = 3\n".into()),
        ]);
        assert_eq!(sources.place(4).to_string(), "/a.toml:1:5");
        // b.toml starts after a.toml's 6 bytes and the one between files.
        assert_eq!(sources.place(7).to_string(), "/conf.d/b.toml:1:1");
        assert_eq!(sources.place(7 + 10).to_string(), "/conf.d/b.toml:2:5");
    }
}
