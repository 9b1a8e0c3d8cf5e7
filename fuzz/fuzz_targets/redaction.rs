//! Fuzzes the redactor (`bearerd::secret::Redactor`) against echoes in encodings the request
//! never used: the input gives a secret and a chain of encodings; the secret is encoded by each
//! in turn (HTML and XML character references, JSON and JavaScript escapes, percent and form
//! encoding, written here apart from bearerd's decoder), put inside some text, and redacted.
//!
//! Input: byte 0 picks the chain's length (low bits) and whether the secret is added as a
//! client secret with its `Basic` forms (bit 7); bytes 1 to 4 pick the encodings; the rest,
//! as UTF-8 (lossy), is the secret. The chain is as long as the bound of normal-form passes
//! leaves after the secret's own normal form (a secret that looks encoded, `%41`, takes a pass
//! of its own).
//!
//! Checks: no panic; the redacted text, brought to normal form once more, holds neither the
//! secret nor its normal form; and the text, when within the redactor's 8 KiB, held the secret
//! as the redactor sees it.
#![no_main]

use std::fmt::Write as _;

use bearerd::secret::normal::{decode_pass, normal_form, MAX_PASSES};
use bearerd::secret::{Redactor, MAX_NORMALISED_BYTES, REDACTED};
use libfuzzer_sys::fuzz_target;

/// The encodings an echo may use, as common escapers write them.
#[derive(Clone, Copy, Debug)]
enum Encoding {
    /// OWASP's HTML escaping: `& < > " ' /` by reference, non-ASCII by hex reference.
    Html,
    /// Every character as a decimal XML reference.
    XmlDecimal,
    /// Every character but letters and digits as a hex reference, in either case.
    XmlHex,
    /// JSON: `\"`, `\\`, `\/`, controls and everything outside ASCII as `\uXXXX` (a pair
    /// beyond the BMP), and `& < >` as Go's HTML-safe encoder writes them.
    Json,
    /// JavaScript `\xHH` for each byte of each character but letters and digits.
    JsHex,
    /// JavaScript `\u{…}` for everything outside printable ASCII, and `\\`.
    JsBrace,
    /// RFC 3986 percent-encoding of all but the unreserved characters, upper-case hex.
    Percent,
    /// The same with lower-case hex.
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

/// Longest secret tried, in characters: longer ones find nothing new and slow the fuzzer.
const MAX_SECRET_CHARS: usize = 64;

fn encode(encoding: Encoding, text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let code = u32::from(c);
        let mut utf8 = [0u8; 4];
        let bytes = c.encode_utf8(&mut utf8).as_bytes();
        // `write!` to a String cannot fail.
        let _ = match encoding {
            Encoding::Html => match c {
                '&' => write!(out, "&amp;"),
                '<' => write!(out, "&lt;"),
                '>' => write!(out, "&gt;"),
                '"' => write!(out, "&quot;"),
                '\'' => write!(out, "&#x27;"),
                '/' => write!(out, "&#x2F;"),
                c if c.is_ascii() => write!(out, "{c}"),
                _ => write!(out, "&#x{code:X};"),
            },
            Encoding::XmlDecimal => write!(out, "&#{code};"),
            Encoding::XmlHex if c.is_ascii_alphanumeric() => write!(out, "{c}"),
            Encoding::XmlHex if code % 2 == 0 => write!(out, "&#x{code:x};"),
            Encoding::XmlHex => write!(out, "&#X{code:X};"),
            Encoding::Json => match c {
                '"' => write!(out, "\\\""),
                '\\' => write!(out, "\\\\"),
                '/' => write!(out, "\\/"),
                '\n' => write!(out, "\\n"),
                ' '..='~' if !"&<>".contains(c) => write!(out, "{c}"),
                _ => {
                    let mut units = [0u16; 2];
                    c.encode_utf16(&mut units)
                        .iter()
                        .try_for_each(|unit| write!(out, "\\u{unit:04x}"))
                }
            },
            Encoding::JsHex if c.is_ascii_alphanumeric() => write!(out, "{c}"),
            Encoding::JsHex => bytes.iter().try_for_each(|b| write!(out, "\\x{b:02x}")),
            Encoding::JsBrace => match c {
                '\\' => write!(out, "\\\\"),
                ' '..='~' => write!(out, "{c}"),
                _ => write!(out, "\\u{{{code:x}}}"),
            },
            Encoding::Percent | Encoding::PercentLower | Encoding::Form => {
                if c.is_ascii_alphanumeric() || "-._~".contains(c) {
                    write!(out, "{c}")
                } else if c == ' ' && matches!(encoding, Encoding::Form) {
                    write!(out, "+")
                } else if matches!(encoding, Encoding::PercentLower) {
                    bytes.iter().try_for_each(|b| write!(out, "%{b:02x}"))
                } else {
                    bytes.iter().try_for_each(|b| write!(out, "%{b:02X}"))
                }
            }
        };
    }
    out
}

/// How many passes `text` takes to reach its normal form.
fn passes(text: &str) -> usize {
    let mut current = text.to_owned();
    let mut count = 0;
    while count < MAX_PASSES {
        match decode_pass(&current) {
            Some(next) => current = next,
            None => break,
        }
        count += 1;
    }
    count
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let (picks, secret) = rest.split_at(rest.len().min(MAX_PASSES));
    let secret: String = String::from_utf8_lossy(secret)
        .chars()
        .take(MAX_SECRET_CHARS)
        .collect();
    let normal = normal_form(&secret);
    // Shorter secrets are found in any text by chance; and a secret the text around it or the
    // marker holds is found there, whatever the redactor does.
    let context = format!("error: {REDACTED}{REDACTED}. end");
    if secret.chars().count() < 4
        || normal.chars().count() < 4
        || context.contains(&secret)
        || context.contains(&normal)
    {
        return;
    }
    let layers = usize::from(control & 0x07)
        .min(picks.len())
        .min(MAX_PASSES - passes(&secret));
    let chain: Vec<Encoding> = picks[..layers]
        .iter()
        .map(|&pick| ALL[usize::from(pick) % ALL.len()])
        .collect();
    let echo = chain
        .iter()
        .fold(secret.clone(), |text, &encoding| encode(encoding, &text));

    let mut redactor = Redactor::new();
    if control & 0x80 != 0 {
        redactor.add_client_secret("fuzz-client", &secret);
    } else {
        redactor.add(&secret);
    }
    let text = format!("error: {echo}. end");
    // Beyond the bound the text is cut, and the secret with it (three layers of references
    // make a few characters several KiB).
    if text.len() <= MAX_NORMALISED_BYTES {
        assert!(redactor.finds_in(&text), "not found in {text:?}");
    }
    let shown = redactor.redact(&text);
    let again = normal_form(&shown);
    assert!(
        !again.contains(&secret) && !again.contains(&normal),
        "{chain:?} of {secret:?}: {text:?} shown as {shown:?}"
    );
});
