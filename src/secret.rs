//! Secrets: the client secret and where it comes from.
//!
//! A [`Secret`] never prints its value: `Debug` shows `[redacted]`, there is no `Display`,
//! and the only way to the value is [`Secret::expose`], so every use is easy to find.
//!
//! A [`Redactor`] removes a credential from text that came back from the network (a token
//! endpoint that echoes the request it got), in every form in which the request carried it
//! and in whatever encoding the echo wraps it: the text is brought to a normal form
//! ([`normal`]) first, and only that form, redacted, is ever shown.

pub mod normal;

use std::fmt::{self, Write as _};
use std::path::PathBuf;

use base64::Engine;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::files::{self, Content, FileError};

/// Whether the file at `path` may be read by others, or by a group that is not bearerd's
/// own (Unix permissions): a key file should be readable by its owner alone. Kubernetes makes
/// Secret files readable by the pod's `fsGroup`, which is bearerd's own group: no warning for
/// that. `false` where it cannot be told.
pub(crate) fn readable_by_others(path: &std::path::Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let Ok(file) = std::fs::metadata(path) else {
            return false;
        };
        // `/proc/self` belongs to the process's effective user and group (Linux).
        let own_group = std::fs::metadata("/proc/self").ok().map(|m| m.gid());
        let by_group = file.mode() & 0o040 != 0 && own_group != Some(file.gid());
        file.mode() & 0o004 != 0 || by_group
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

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

impl Drop for Secret {
    /// Wiped, so that a secret or token does not linger in freed memory.
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut *self.0);
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
    /// Reads the secret now, on the calling thread: at start and for `--check`. A file is read
    /// by the bounded reader (`files`), so a FIFO or a device is refused, not waited on.
    pub fn read(&self) -> Result<Secret, SecretError> {
        match self {
            Self::File(path) => self.secret_in(path, &files::read_sync(path, Content::Secret)?),
            Self::Env(name) => {
                self.non_empty(std::env::var(name).map_err(|cause| match cause {
                    std::env::VarError::NotPresent => {
                        SecretError::EnvMissing { name: name.clone() }
                    }
                    std::env::VarError::NotUnicode(_) => {
                        SecretError::EnvNotUnicode { name: name.clone() }
                    }
                })?)
            }
            Self::Inline(secret) => Ok(secret.clone()),
        }
    }

    /// Reads the secret for a token request: a file off the runtime's thread, waiting until
    /// `deadline` at most (the token `timeout`), so that no file can hold up the process.
    pub(crate) async fn read_within(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<Secret, SecretError> {
        match self {
            Self::File(path) => {
                let contents = files::read(path, Content::Secret, deadline).await?;
                self.secret_in(path, &contents)
            }
            Self::Env(_) | Self::Inline(_) => self.read(),
        }
    }

    /// The secret a file held: the whole file as text, minus trailing line breaks.
    fn secret_in(&self, path: &std::path::Path, contents: &[u8]) -> Result<Secret, SecretError> {
        let text = files::text(contents, path, Content::Secret)?;
        // `echo secret > file` and most editors end the file with a line break that is not
        // part of the secret.
        self.non_empty(text.trim_end_matches(['\n', '\r']).to_owned())
    }

    /// The value, unless it is empty.
    fn non_empty(&self, value: String) -> Result<Secret, SecretError> {
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
    /// The file is missing or unreadable, not a regular file, too large, or not text.
    #[error(transparent)]
    File(#[from] FileError),
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

/// What replaces a credential in redacted text.
pub const REDACTED: &str = "[redacted]";

/// RFC 3986 §2.3: the characters percent-encoding leaves alone.
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Shortest run of base64 characters taken as the mark of a credential inside a longer
/// base64 value; shorter runs would match ordinary text.
const MIN_BASE64_CORE: usize = 8;

/// Longest piece of a text that is brought to normal form and searched: more than any error
/// body or field is worth quoting, and a bound on the work one answer can ask for.
pub const MAX_NORMALISED_BYTES: usize = 8 * 1024;

/// What a cut at [`MAX_NORMALISED_BYTES`] can leave of one escape beyond the credential's own
/// characters, partly decoded: a character written as `&#x10FFFF;` or as a surrogate pair of
/// `\uXXXX`, percent-encoded again in the next layers.
const CUT_ESCAPE_CHARS: usize = 128;

/// Removes credentials from untrusted text, in every form a request may have carried them and
/// in every encoding an echo may wrap them in.
///
/// Text is first brought to a normal form ([`normal`]: character references, JSON and
/// JavaScript escapes and percent-encoding decoded, pass after pass), and each credential is
/// looked for at every step on the way there: as it is, form-urlencoded, percent-encoded (either
/// hex case), in its own normal form (and that with `+` for spaces, as form encoding writes
/// them), and in base64 or base64url, alone or inside a longer value such as a `Basic` header.
/// What comes out is the normal form, redacted, with control characters escaped: a log line
/// never shows an encoded text, only what it says.
///
/// Whatever text a token endpoint sends back goes through one before it reaches a log line,
/// so that an endpoint that echoes the request it got cannot put the secret there.
#[derive(Clone, Default)]
pub struct Redactor {
    /// Every form of every credential, longest first, so that a longer form is replaced before
    /// a shorter one inside it breaks it up.
    forms: Vec<String>,
    /// Characters in the longest form: what a cut at [`MAX_NORMALISED_BYTES`] may leave of a
    /// credential at the end of a text.
    longest: usize,
}

impl Redactor {
    /// A redactor that removes nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a credential sent as text: a secret, a password, an assertion.
    pub fn add(&mut self, credential: &str) {
        if credential.is_empty() {
            return;
        }
        let form_encoded: String = form_urlencoded::byte_serialize(credential.as_bytes()).collect();
        let percent_encoded = utf8_percent_encode(credential, UNRESERVED).to_string();
        let lower_hex = lowercase_percent_escapes(&percent_encoded);
        for form in [form_encoded, percent_encoded, lower_hex] {
            self.push(form);
        }
        // The credential as text is normalised, step by step: a credential that looks
        // encoded itself (`p%41ss`, `a&amp;b`) is decoded with the text around it.
        for normal in std::iter::once(credential.to_owned()).chain(normal::stages(credential)) {
            // Form encoding's `+` for a space, left in the text by the normal form.
            if normal.contains(' ') {
                self.push(normal.replace(' ', "+"));
            }
            self.push(normal);
        }
        // A credential inside any base64 value: the characters that encode its bytes alone,
        // at each of the three alignments it may have in the encoded value.
        for alignment in 0..3 {
            for core in base64_cores(credential.as_bytes(), alignment) {
                self.push(core);
            }
        }
    }

    /// Adds a client secret and the `Basic` credentials made of it: `client_id:secret` in
    /// base64 and base64url, both as written and RFC 6749 §2.3.1-encoded, each also
    /// percent-encoded (as a `Location` or an echoed URL would carry it).
    pub fn add_client_secret(&mut self, client_id: &str, secret: &str) {
        self.add(secret);
        if secret.is_empty() {
            return;
        }
        let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        for pair in [
            format!("{client_id}:{secret}"),
            format!("{}:{}", encode(client_id), encode(secret)),
        ] {
            for engine in [
                &base64::engine::general_purpose::STANDARD,
                &base64::engine::general_purpose::URL_SAFE,
            ] {
                let encoded = engine.encode(&pair);
                let unpadded = encoded.trim_end_matches('=').to_owned();
                let escaped = utf8_percent_encode(&encoded, UNRESERVED).to_string();
                let lower = lowercase_percent_escapes(&escaped);
                for form in [encoded, unpadded, escaped, lower] {
                    self.push(form);
                }
            }
        }
    }

    fn push(&mut self, form: String) {
        if !form.is_empty() && !self.forms.contains(&form) {
            self.longest = self.longest.max(form.chars().count());
            self.forms.push(form);
            self.forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
        }
    }

    /// `text` in normal form with every form of every credential replaced by [`REDACTED`],
    /// and control characters (and the format characters that reorder a line) escaped as
    /// `\n`, `\u{1b}` (a backslash as `\\`).
    ///
    /// A text that a last pass would still change is not in normal form and is not shown:
    /// [`REDACTED`] and why stand for it. Only the first [`MAX_NORMALISED_BYTES`] of `text` are
    /// read; a text cut there ends in `…`, without the end that could hold the start of a
    /// credential. (Escapes and markers can be longer than what they replace, so the result
    /// can be somewhat longer than that.)
    pub fn redact(&self, text: &str) -> String {
        let (clean, _) = self.clean(text);
        self.finish(&clean)
    }

    /// Like [`redact`](Self::redact), on one line: every run of white space (line breaks
    /// included) as one space, as an excerpt of a body is quoted.
    pub fn redact_line(&self, text: &str) -> String {
        let (clean, _) = self.clean(text);
        let folded = clean.split_whitespace().collect::<Vec<_>>().join(" ");
        // Folding can join what a line break kept apart.
        self.finish(&self.replace(folded, &mut false))
    }

    /// Whether `text` holds any form of a credential, as it is or on its way to normal form.
    pub fn finds_in(&self, text: &str) -> bool {
        self.clean(text).1
    }

    /// `text` cut to [`MAX_NORMALISED_BYTES`], brought to normal form and redacted at every
    /// step, and whether anything was redacted.
    fn clean(&self, text: &str) -> (String, bool) {
        let cut = text.len() > MAX_NORMALISED_BYTES;
        let head = text
            .get(..floor_char_boundary(text, MAX_NORMALISED_BYTES))
            .unwrap_or_default();
        let mut found = false;
        // Redacted before anything is decoded, so that a credential written as it is cannot
        // be decoded into something else with the text around it.
        let mut current = self.replace(head.to_owned(), &mut found);
        for _ in 0..normal::MAX_PASSES {
            match normal::decode_pass(&current) {
                Some(next) => current = self.replace(next, &mut found),
                None => break,
            }
        }
        if normal::decode_pass(&current).is_some() {
            // Still encoded after the last pass: not in normal form, so not shown, as an
            // echo nested one layer deeper than the passes reach would be shown encoded.
            return (
                format!(
                    "{REDACTED} (still encoded after {} decoding passes)",
                    normal::MAX_PASSES
                ),
                found,
            );
        }
        if cut {
            // The cut may have gone through a credential, leaving its start, too short to be
            // matched, at the end: that end is dropped, as long as the longest form and what
            // one escape can add.
            let kept = current
                .chars()
                .count()
                .saturating_sub(self.longest + CUT_ESCAPE_CHARS);
            current = current.chars().take(kept).collect();
            current.push('…');
        }
        (current, found)
    }

    /// `text` with every form replaced; `found` is set when there was one.
    fn replace(&self, mut text: String, found: &mut bool) -> String {
        for form in &self.forms {
            if text.contains(form.as_str()) {
                *found = true;
                text = text.replace(form.as_str(), REDACTED);
            }
        }
        text
    }

    /// Control characters escaped, and redacted once more: an escape written here must not
    /// complete a credential that holds one (`a\nb` written out as it was meant).
    fn finish(&self, text: &str) -> String {
        self.replace(escape_controls(text), &mut false)
    }
}

/// The largest character boundary of `text` at or below `index`.
fn floor_char_boundary(text: &str, index: usize) -> usize {
    (0..=index.min(text.len()))
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0)
}

/// `text` with control characters written as escapes (`\n`, `\r`, `\t`, `\u{1b}`, and `\\` for
/// a backslash), and
/// with them the characters that change how a line is shown: bidirectional overrides and
/// isolates (Unicode TR 9), which can make a log line read as something else, and the line
/// and paragraph separators.
fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            // A backslash of the text itself is escaped too, so that the escapes written here
            // read back as what they stand for and nothing else.
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control()
                || matches!(
                    c,
                    '\u{061C}'
                        | '\u{200E}'
                        | '\u{200F}'
                        | '\u{202A}'..='\u{202E}'
                        | '\u{2066}'..='\u{2069}'
                        | '\u{2028}'
                        | '\u{2029}'
                ) =>
            {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

/// Names how many forms it holds, never the forms.
impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redactor({} forms)", self.forms.len())
    }
}

/// `%2F` as `%2f`: hex digits in escapes are case-insensitive (RFC 3986 §2.1).
fn lowercase_percent_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut hex_left = 0;
    for c in text.chars() {
        if hex_left > 0 {
            out.push(c.to_ascii_lowercase());
            hex_left -= 1;
        } else {
            if c == '%' {
                hex_left = 2;
            }
            out.push(c);
        }
    }
    out
}

/// The base64 and base64url characters that depend only on `bytes`, when `bytes` start
/// `alignment` bytes into a 3-byte group of a longer encoded value: whatever surrounds them,
/// these characters appear in the encoding. Empty when fewer than [`MIN_BASE64_CORE`].
fn base64_cores(bytes: &[u8], alignment: usize) -> Vec<String> {
    let mut padded = vec![0u8; alignment];
    padded.extend_from_slice(bytes);
    let start_bit = alignment * 8;
    let end_bit = padded.len() * 8;
    // Character i encodes bits [6i, 6i + 6): it depends on `bytes` alone when that range lies
    // within theirs.
    let first = start_bit.div_ceil(6);
    let last = end_bit / 6; // exclusive
    if last < first + MIN_BASE64_CORE {
        return Vec::new();
    }
    [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::URL_SAFE,
    ]
    .into_iter()
    .filter_map(|engine| engine.encode(&padded).get(first..last).map(str::to_owned))
    .collect()
}

#[cfg(test)]
mod tests {
    #[cfg(unix)]
    #[test]
    fn key_files_readable_by_strangers_are_told_apart() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(&path, "k").unwrap();
        let mode = |m| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m)).unwrap();
        mode(0o600);
        assert!(!super::readable_by_others(&path));
        mode(0o644);
        assert!(super::readable_by_others(&path));
        // The file is in this process's own group (it made it): group-readable is fine.
        mode(0o640);
        assert!(!super::readable_by_others(&path));
    }

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

#[cfg(test)]
mod redactor_tests {
    use super::*;

    const ID: &str = "my app";
    const SECRET: &str = "p@ss/word+1 ü";

    fn redactor() -> Redactor {
        let mut r = Redactor::new();
        r.add_client_secret(ID, SECRET);
        r
    }

    #[test]
    fn removes_every_form_a_request_carries() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let b64url = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let form = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let percent = |s: &str| utf8_percent_encode(s, UNRESERVED).to_string();
        let encoded_pair = format!("{}:{}", form(ID), form(SECRET));
        let forms = [
            SECRET.to_owned(),
            form(SECRET),
            percent(SECRET),
            lowercase_percent_escapes(&percent(SECRET)),
            b64(&format!("{ID}:{SECRET}")),
            b64(&encoded_pair),
            b64url(&encoded_pair),
            percent(&b64(&encoded_pair)),
            lowercase_percent_escapes(&percent(&b64(&encoded_pair))),
            // The secret inside some other base64 value, at each alignment.
            b64(&format!("x{SECRET}yz")),
            b64(&format!("xy{SECRET}z")),
            b64url(&format!("{{\"sub\":\"{SECRET}\"}}")),
        ];
        let r = redactor();
        for leaked in forms {
            let text = format!("echo: Authorization: Basic {leaked}; end");
            let redacted = r.redact(&text);
            assert!(
                redacted.contains(REDACTED),
                "{leaked} was not removed: {redacted}"
            );
            assert!(
                !r.finds_in(&redacted),
                "{leaked}: something is left: {redacted}"
            );
        }
    }

    #[test]
    fn leaves_other_text_alone() {
        let r = redactor();
        let text = "invalid_client: Client authentication failed for my app";
        assert_eq!(r.redact(text), text);
        assert!(!format!("{r:?}").contains(SECRET));
    }

    #[test]
    fn short_secrets_are_removed_where_they_stand_but_not_searched_inside_base64() {
        let mut r = Redactor::new();
        r.add("abc");
        assert_eq!(r.redact("xabcx"), "x[redacted]x");
        // Three bytes make too few base64 characters of their own to be a reliable mark.
        assert!(base64_cores(b"abc", 1).is_empty());
    }
}

/// The redactor against echoes in encodings a request never used: each one alone, nested, and
/// mixed within one secret, by encoders written here apart from the decoder.
#[cfg(test)]
mod encoding_tests {
    use std::fmt::Write as _;

    use proptest::prelude::*;

    use super::normal::{normal_form, stages, MAX_PASSES};
    use super::*;

    /// The issue's example: characters each encoding changes (`/`, `&`, `=`, `+`, space,
    /// `%`, `"`, `<`, a backslash, non-ASCII in and beyond the BMP).
    const SECRET: &str = "S3cr3t/päss&x=1+2 %<\"\\>😀";

    fn redactor() -> Redactor {
        let mut r = Redactor::new();
        r.add_client_secret("app", SECRET);
        r
    }

    /// The encodings an echo may use, as common escapers write them.
    #[derive(Clone, Copy, Debug)]
    enum Encoding {
        /// OWASP's HTML escaping: `& < > " ' /` by reference, non-ASCII by name or number.
        Html,
        /// Every character as a decimal XML reference.
        XmlDecimal,
        /// Every character but letters and digits as a hex reference.
        XmlHex,
        /// JSON with `\/`, and everything outside printable ASCII as `\uXXXX` (pairs beyond the
        /// BMP), and `& < >` too (as Go's HTML-safe encoder does).
        Json,
        /// JavaScript `\xHH` for each byte of each character but letters and digits.
        JsHex,
        /// JavaScript `\u{…}` for everything outside printable ASCII, and `\\`.
        JsBrace,
        /// RFC 3986 percent-encoding of all but the unreserved characters.
        Percent,
        /// The same with lower-case hex digits.
        PercentLower,
        /// Form encoding: `+` for a space.
        Form,
    }

    const ALL: [Encoding; 9] = [
        Encoding::Html,
        Encoding::XmlDecimal,
        Encoding::XmlHex,
        Encoding::Json,
        Encoding::JsHex,
        Encoding::JsBrace,
        Encoding::Percent,
        Encoding::PercentLower,
        Encoding::Form,
    ];

    fn encode(encoding: Encoding, text: &str) -> String {
        let mut out = String::new();
        for c in text.chars() {
            let code = u32::from(c);
            let mut utf8 = [0u8; 4];
            let bytes = c.encode_utf8(&mut utf8).as_bytes();
            match encoding {
                Encoding::Html => match c {
                    '&' => out.push_str("&amp;"),
                    '<' => out.push_str("&lt;"),
                    '>' => out.push_str("&gt;"),
                    '"' => out.push_str("&quot;"),
                    '\'' => out.push_str("&#x27;"),
                    '/' => out.push_str("&#x2F;"),
                    'ä' => out.push_str("&auml;"),
                    c if c.is_ascii() => out.push(c),
                    c => write!(out, "&#x{:X};", u32::from(c)).unwrap(),
                },
                Encoding::XmlDecimal => write!(out, "&#{code};").unwrap(),
                Encoding::XmlHex if c.is_ascii_alphanumeric() => out.push(c),
                Encoding::XmlHex => write!(out, "&#x{code:x};").unwrap(),
                Encoding::Json => match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '/' => out.push_str("\\/"),
                    '\n' => out.push_str("\\n"),
                    ' '..='~' if !"&<>".contains(c) => out.push(c),
                    c => {
                        let mut units = [0u16; 2];
                        for unit in c.encode_utf16(&mut units) {
                            write!(out, "\\u{unit:04x}").unwrap();
                        }
                    }
                },
                Encoding::JsHex if c.is_ascii_alphanumeric() => out.push(c),
                Encoding::JsHex => {
                    for b in bytes {
                        write!(out, "\\x{b:02x}").unwrap();
                    }
                }
                Encoding::JsBrace => match c {
                    '\\' => out.push_str("\\\\"),
                    ' '..='~' => out.push(c),
                    c => write!(out, "\\u{{{:x}}}", u32::from(c)).unwrap(),
                },
                Encoding::Percent | Encoding::PercentLower | Encoding::Form => {
                    if c.is_ascii_alphanumeric() || "-._~".contains(c) {
                        out.push(c);
                    } else if c == ' ' && matches!(encoding, Encoding::Form) {
                        out.push('+');
                    } else {
                        for b in bytes {
                            if matches!(encoding, Encoding::PercentLower) {
                                write!(out, "%{b:02x}").unwrap();
                            } else {
                                write!(out, "%{b:02X}").unwrap();
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn assert_redacted(r: &Redactor, echo: &str) {
        let text = format!("<p>invalid client_secret {echo}, try again</p>");
        let shown = r.redact(&text);
        assert!(
            shown.contains(REDACTED),
            "{echo}: nothing redacted: {shown}"
        );
        assert!(!shown.contains(SECRET), "{echo}: {shown}");
        assert!(!normal_form(&shown).contains(SECRET), "{echo}: {shown}");
        assert!(!r.finds_in(&shown), "{echo}: something is left: {shown}");
        assert!(r.finds_in(&text), "{echo}");
        // The text around it is shown decoded.
        assert!(shown.starts_with("<p>invalid client_secret "), "{shown}");
    }

    #[test]
    fn each_encoding_alone() {
        let r = redactor();
        for encoding in ALL {
            let echo = encode(encoding, SECRET);
            assert_ne!(echo, SECRET, "{encoding:?}");
            assert_redacted(&r, &echo);
        }
    }

    #[test]
    fn the_issues_examples() {
        let mut r = Redactor::new();
        r.add("S3cr3t/päss");
        for echo in [
            "S3cr3t&#x2F;p&auml;ss&amp;x=1",
            "&#83;&#51;&#99;&#114;&#51;&#116;&#47;&#112;&#228;&#115;&#115;",
            r"S3cr3t\/p\u00e4ss",
        ] {
            let shown = r.redact(echo);
            assert!(shown.starts_with(REDACTED), "{echo}: {shown}");
            assert!(!shown.contains("S3cr3t"), "{echo}: {shown}");
        }
    }

    #[test]
    fn nested_encodings() {
        let r = redactor();
        for outer in ALL {
            for inner in ALL {
                assert_redacted(&r, &encode(outer, &encode(inner, SECRET)));
            }
        }
        // Four layers, the bound.
        let four = [
            Encoding::Form,
            Encoding::Json,
            Encoding::Html,
            Encoding::Percent,
        ]
        .iter()
        .fold(SECRET.to_owned(), |text, &e| encode(e, &text));
        assert_redacted(&r, &four);
    }

    #[test]
    fn encodings_mixed_within_one_secret() {
        let r = redactor();
        // Each character in the next encoding round.
        let mixed: String = SECRET
            .chars()
            .enumerate()
            .map(|(i, c)| encode(ALL[i % ALL.len()], &c.to_string()))
            .collect();
        assert_redacted(&r, &mixed);
        // Halves in different encodings, one of them nested.
        let (head, tail) = SECRET.split_at(SECRET.find('&').unwrap());
        let half = format!(
            "{}{}",
            encode(Encoding::XmlDecimal, head),
            encode(Encoding::Percent, &encode(Encoding::Json, tail))
        );
        assert_redacted(&r, &half);
    }

    #[test]
    fn a_secret_that_looks_encoded_is_found_as_written_and_encoded() {
        // Its own normal form differs from it: `p%41ss&amp;x\u0041` reads `pAss&xA`.
        let secret = r"p%41ss&amp;x\u0041 +y";
        let mut r = Redactor::new();
        r.add(secret);
        for echo in [
            secret.to_owned(),
            encode(Encoding::Html, secret),
            encode(Encoding::Json, secret),
            encode(Encoding::Form, secret),
            encode(Encoding::Percent, &encode(Encoding::Html, secret)),
            normal_form(secret),
        ] {
            let shown = r.redact(&format!("got {echo}."));
            assert_eq!(shown, "got [redacted].", "{echo}");
        }
    }

    #[test]
    fn a_plus_is_matched_as_the_secret_has_it_and_as_form_encoding_writes_a_space() {
        let mut r = Redactor::new();
        r.add("a+b c/d");
        for echo in [
            "a+b c/d",
            "a%2Bb+c%2Fd",
            "a&#43;b+c&#x2f;d",
            r"a+b+c\/d",
            "a%2Bb%20c%2Fd",
        ] {
            assert_eq!(r.redact(echo), REDACTED, "{echo}");
        }
        // Base64 keeps its `+`: the Basic form is still found.
        let mut r = Redactor::new();
        r.add_client_secret("app", "s3cr3t~~>");
        let basic = base64::engine::general_purpose::STANDARD.encode("app:s3cr3t~~>");
        assert!(basic.contains('+'), "{basic}");
        assert_eq!(r.redact(&format!("&#x3D;{basic}")), format!("={REDACTED}"));
    }

    #[test]
    fn control_characters_are_escaped_after_redaction() {
        let mut r = Redactor::new();
        r.add("line1\nline2");
        assert_eq!(
            r.redact(r"x\nline1\nline2\u001b[31m"),
            r"x\n[redacted]\u{1b}[31m"
        );
        // A bidirectional override would make the line read otherwise.
        assert_eq!(r.redact("a&#x202E;b\u{2066}"), r"a\u{202e}b\u{2066}");
        // One line: white space folded, then redacted again, then escaped.
        let mut r = Redactor::new();
        r.add("a b");
        assert_eq!(
            r.redact_line("<p>\n  a\n b\t</p>\u{7}"),
            r"<p> [redacted] </p>\u{7}"
        );
    }

    #[test]
    fn a_long_text_is_cut_without_leaving_part_of_a_secret() {
        let r = redactor();
        let echo = encode(Encoding::XmlDecimal, SECRET);
        for filler in 0..echo.len() {
            // The cut at MAX_NORMALISED_BYTES falls at each place inside the echo.
            let text = format!(
                "{}{echo}{}",
                "x".repeat(MAX_NORMALISED_BYTES - filler),
                "y".repeat(100)
            );
            let shown = r.redact(&text);
            assert!(shown.ends_with('…'), "{filler}");
            // Escapes and markers can be longer than what they stand for; not much longer.
            assert!(shown.len() < 2 * MAX_NORMALISED_BYTES, "{filler}");
            // Not even its first two characters, decoded or not.
            assert!(!normal_form(&shown).contains("S3"), "{filler}: {shown}");
        }
    }

    #[test]
    fn nothing_decodes_forever_and_nothing_grows() {
        let r = redactor();
        let text = "%25252541".repeat(2000);
        let shown = r.redact(&text);
        assert!(shown.len() <= MAX_NORMALISED_BYTES + '…'.len_utf8());
        assert!(shown.starts_with("AAAA"), "{shown}");
        // One layer more than the passes reach: not in normal form, so not shown.
        assert_eq!(stages("%2525252541").len(), MAX_PASSES);
        assert_eq!(
            r.redact(&format!("{SECRET} and %2525252541")),
            "[redacted] (still encoded after 4 decoding passes)"
        );
    }

    /// Inputs the `redaction` fuzz target found.
    #[test]
    fn found_by_fuzzing() {
        // A NUL, written `&#0;` by an escaper that writes every character by number.
        let secret = "p%41ss&amp;x\\b\0\0\x001";
        let mut r = Redactor::new();
        r.add(secret);
        let echo = encode(Encoding::XmlDecimal, secret);
        assert_eq!(
            r.redact(&format!("error: {echo}. end")),
            "error: [redacted]. end"
        );
    }

    /// A secret of characters that every encoding touches, escape-like ones included.
    fn secret_strategy() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                proptest::char::range('a', 'z'),
                proptest::char::range('0', '9'),
                proptest::sample::select(vec![
                    '%', '&', '#', ';', '\\', '/', '+', ' ', '"', '\'', '<', 'x', 'u', '{', '}',
                    'ä', '€', '😀', '\n',
                ]),
            ],
            6..24,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Wrapped in as many layers as the bound leaves after its own normal form, the
        /// secret is found, and nothing of its normal form is left in what is shown.
        #[test]
        fn no_encoded_secret_survives(
            secret in secret_strategy(),
            chain in proptest::collection::vec(0..ALL.len(), 0..=MAX_PASSES),
        ) {
            let normal = normal_form(&secret);
            let context = format!("error {REDACTED}{REDACTED} end");
            prop_assume!(!context.contains(&secret) && !context.contains(&normal));
            let layers = MAX_PASSES - stages(&secret).len();
            let echo = chain
                .iter()
                .take(layers)
                .fold(secret.clone(), |text, &e| encode(ALL[e], &text));
            let mut r = Redactor::new();
            r.add(&secret);
            let shown = r.redact(&format!("error {echo} end"));
            let again = normal_form(&shown);
            prop_assert!(
                !again.contains(&secret) && !again.contains(&normal),
                "{echo:?} shown as {shown:?}"
            );
        }
    }
}
