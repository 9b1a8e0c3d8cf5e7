//! The normal form of text from the network, in which the [`Redactor`](super::Redactor)
//! looks for credentials.
//!
//! An endpoint that echoes the request it got may wrap what it echoes in any encoding its
//! framework likes: HTML or XML character references, JSON or JavaScript string escapes,
//! percent-encoding, or several of them in turn. A list of encoded forms of the secret cannot
//! be complete, so the text is decoded instead: every escape of those kinds, pass after pass
//! while a pass changes something (at most [`MAX_PASSES`]), and the secret is looked for in
//! what that leaves. Decoding never makes a text longer, so the work is bounded by the
//! text's length and the passes.
//!
//! What is decoded:
//! - character references (HTML Living Standard §13.5, XML 1.0 §4.1): decimal `&#83;` and
//!   hexadecimal `&#x53;`, with or without the closing `;` (as HTML parsers accept them), and
//!   by name the XML five, `&nbsp;`, the other Latin-1 names of HTML 4 and the names HTML 5
//!   gives to ASCII punctuation, each with its `;`;
//! - JSON (RFC 8259 §7) and JavaScript (ECMA-262 §12.9.4) string escapes: `\uXXXX`, a
//!   UTF-16 surrogate pair of them as one character, `\u{X…}`, `\xHH`, `\/`, `\"`, `\'`,
//!   `\\`, `\b`, `\f`, `\n`, `\r`, `\t`, `\v` and `\0`;
//! - percent-encoding (RFC 3986 §2.1) in either hex case, and the `%uXXXX` of JavaScript's
//!   old `escape()`.
//!
//! A run of `%HH` or `\xHH` escapes is read as UTF-8 where it is valid, and any byte that is
//! not as the Latin-1 character of that number (what JavaScript's `escape()` and `\xHH`
//! mean). An escape that does not decode to a character (a lone surrogate, a code point past
//! U+10FFFF) is left as it is.
//!
//! `+` is left alone, although form encoding (WHATWG URL §5) writes a space as `+`: a secret
//! may hold a `+` of its own, and base64 is full of them. The redactor instead also matches
//! each normal form of a secret with its spaces written as `+`.

/// Most passes made over one text: each undoes one layer of encoding, and four layers are
/// more than any echo seen in the wild (a form value, JSON-escaped, inside an HTML page,
/// percent-encoded in a link is three).
pub const MAX_PASSES: usize = 4;

/// `text` in normal form: decoded pass after pass (see [`decode_pass`]) while a pass changes
/// it, at most [`MAX_PASSES`] times.
pub fn normal_form(text: &str) -> String {
    let mut current = text.to_owned();
    for _ in 0..MAX_PASSES {
        match decode_pass(&current) {
            Some(next) => current = next,
            None => break,
        }
    }
    current
}

/// The text after each pass that changed it, in order, at most [`MAX_PASSES`] of them: the
/// last is the normal form, and the others are how the text looks on the way there.
pub(crate) fn stages(text: &str) -> Vec<String> {
    let mut stages: Vec<String> = Vec::new();
    for _ in 0..MAX_PASSES {
        let current = stages.last().map_or(text, String::as_str);
        match decode_pass(current) {
            Some(next) => stages.push(next),
            None => break,
        }
    }
    stages
}

/// One pass over `text`, left to right, decoding every escape of every kind described above;
/// what an escape decodes to is not looked at again in the same pass, so that one pass undoes
/// one layer of encoding (`%2541` becomes `%41`, not `A`). `None` when the text holds nothing
/// to decode.
pub fn decode_pass(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = String::new();
    // Bytes from here up to the escape being looked at are copied as they are. Escapes start
    // with an ASCII byte, so both ends of a copy always fall on character boundaries.
    let mut plain_from = 0;
    let mut at = 0;
    let mut changed = false;
    while at < bytes.len() {
        let mut piece = String::new();
        let end = match bytes[at] {
            b'&' => char_reference(bytes, at, &mut piece),
            b'\\' => backslash_escape(bytes, at, &mut piece),
            b'%' => percent_escape(bytes, at, &mut piece),
            _ => None,
        };
        match end {
            Some(end) => {
                out.push_str(text.get(plain_from..at).unwrap_or_default());
                out.push_str(&piece);
                changed = true;
                at = end;
                plain_from = end;
            }
            None => at += 1,
        }
    }
    if !changed {
        return None;
    }
    out.push_str(text.get(plain_from..).unwrap_or_default());
    Some(out)
}

/// The value of the hex digit `b`.
fn hex_value(b: u8) -> Option<u32> {
    char::from(b).to_digit(16)
}

/// The value of the `count` hex digits at `at`, if there are that many.
fn hex_digits(bytes: &[u8], at: usize, count: usize) -> Option<u32> {
    let digits = bytes.get(at..at.checked_add(count)?)?;
    digits
        .iter()
        .try_fold(0u32, |value, &b| Some(value * 16 + hex_value(b)?))
}

/// A character reference at `at` (which holds `&`): decoded into `out`, returning where it
/// ends.
fn char_reference(bytes: &[u8], at: usize, out: &mut String) -> Option<usize> {
    if bytes.get(at + 1) == Some(&b'#') {
        let (radix, digits_from) = match bytes.get(at + 2) {
            Some(b'x' | b'X') => (16, at + 3),
            _ => (10, at + 2),
        };
        let mut end = digits_from;
        let mut value: u32 = 0;
        while let Some(digit) = bytes.get(end).and_then(|&b| char::from(b).to_digit(radix)) {
            // Saturates past any code point, so that a long run of digits is refused, not
            // wrapped round to a character.
            value = value.saturating_mul(radix).saturating_add(digit);
            end += 1;
        }
        if end == digits_from {
            return None;
        }
        // `&#0;` too, although neither language allows it: a naive escaper writes it for a
        // NUL, and what it stands for is what matters here.
        let c = char::from_u32(value)?;
        if bytes.get(end) == Some(&b';') {
            end += 1;
        }
        out.push(c);
        return Some(end);
    }
    // Named: letters and digits, then `;`.
    let name_from = at + 1;
    let name_len = bytes
        .get(name_from..)?
        .iter()
        .take(MAX_NAME + 1)
        .take_while(|b| b.is_ascii_alphanumeric())
        .count();
    let end = name_from + name_len;
    if name_len == 0 || name_len > MAX_NAME || bytes.get(end) != Some(&b';') {
        return None;
    }
    let name = std::str::from_utf8(bytes.get(name_from..end)?).ok()?;
    out.push(named_reference(name)?);
    Some(end + 1)
}

/// Characters in the longest name below (`DiacriticalGrave`).
const MAX_NAME: usize = 16;

/// HTML 4's names for U+00A0 to U+00FF, in order (HTML 4.01 §24.2, which HTML 5 keeps).
const LATIN1_NAMES: [&str; 96] = [
    "nbsp", "iexcl", "cent", "pound", "curren", "yen", "brvbar", "sect", "uml", "copy", "ordf",
    "laquo", "not", "shy", "reg", "macr", "deg", "plusmn", "sup2", "sup3", "acute", "micro",
    "para", "middot", "cedil", "sup1", "ordm", "raquo", "frac14", "frac12", "frac34", "iquest",
    "Agrave", "Aacute", "Acirc", "Atilde", "Auml", "Aring", "AElig", "Ccedil", "Egrave", "Eacute",
    "Ecirc", "Euml", "Igrave", "Iacute", "Icirc", "Iuml", "ETH", "Ntilde", "Ograve", "Oacute",
    "Ocirc", "Otilde", "Ouml", "times", "Oslash", "Ugrave", "Uacute", "Ucirc", "Uuml", "Yacute",
    "THORN", "szlig", "agrave", "aacute", "acirc", "atilde", "auml", "aring", "aelig", "ccedil",
    "egrave", "eacute", "ecirc", "euml", "igrave", "iacute", "icirc", "iuml", "eth", "ntilde",
    "ograve", "oacute", "ocirc", "otilde", "ouml", "divide", "oslash", "ugrave", "uacute", "ucirc",
    "uuml", "yacute", "thorn", "yuml",
];

/// Other names: the XML five (XML 1.0 §4.6) and their upper-case HTML forms, HTML 5's names for
/// ASCII punctuation (which escapers that name everything use), and a few typographic ones.
const OTHER_NAMES: &[(&str, char)] = &[
    ("amp", '&'),
    ("lt", '<'),
    ("gt", '>'),
    ("quot", '"'),
    ("apos", '\''),
    ("AMP", '&'),
    ("LT", '<'),
    ("GT", '>'),
    ("QUOT", '"'),
    ("Tab", '\t'),
    ("NewLine", '\n'),
    ("excl", '!'),
    ("num", '#'),
    ("dollar", '$'),
    ("percnt", '%'),
    ("lpar", '('),
    ("rpar", ')'),
    ("ast", '*'),
    ("midast", '*'),
    ("plus", '+'),
    ("comma", ','),
    ("period", '.'),
    ("sol", '/'),
    ("colon", ':'),
    ("semi", ';'),
    ("equals", '='),
    ("quest", '?'),
    ("commat", '@'),
    ("lsqb", '['),
    ("lbrack", '['),
    ("bsol", '\\'),
    ("rsqb", ']'),
    ("rbrack", ']'),
    ("Hat", '^'),
    ("lowbar", '_'),
    ("UnderBar", '_'),
    ("grave", '`'),
    ("DiacriticalGrave", '`'),
    ("lcub", '{'),
    ("lbrace", '{'),
    ("verbar", '|'),
    ("vert", '|'),
    ("VerticalLine", '|'),
    ("rcub", '}'),
    ("rbrace", '}'),
    ("ndash", '\u{2013}'),
    ("mdash", '\u{2014}'),
    ("lsquo", '\u{2018}'),
    ("rsquo", '\u{2019}'),
    ("ldquo", '\u{201C}'),
    ("rdquo", '\u{201D}'),
    ("hellip", '\u{2026}'),
    ("euro", '\u{20AC}'),
];

/// The character a named reference stands for, if the name is one of those above.
fn named_reference(name: &str) -> Option<char> {
    if let Some(index) = LATIN1_NAMES.iter().position(|&n| n == name) {
        return u32::try_from(index)
            .ok()
            .and_then(|i| char::from_u32(0xA0 + i));
    }
    OTHER_NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, c)| c)
}

/// A backslash escape at `at` (which holds `\`): decoded into `out`, returning where it ends.
fn backslash_escape(bytes: &[u8], at: usize, out: &mut String) -> Option<usize> {
    let simple = match *bytes.get(at + 1)? {
        b'u' => return unicode_escape(bytes, at, b'\\', out),
        b'x' => return byte_run(bytes, at, b"\\x", out),
        b'/' => '/',
        b'"' => '"',
        b'\'' => '\'',
        b'\\' => '\\',
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        b'v' => '\u{b}',
        // ECMA-262: `\0` not followed by a digit (which would make a legacy octal escape).
        b'0' if !bytes.get(at + 2).is_some_and(u8::is_ascii_digit) => '\0',
        _ => return None,
    };
    out.push(simple);
    Some(at + 2)
}

/// `\uXXXX` (or `%uXXXX`, `lead` being `\` or `%`) at `at`, a surrogate pair of them, or
/// `\u{X…}`: decoded into `out`, returning where it ends.
fn unicode_escape(bytes: &[u8], at: usize, lead: u8, out: &mut String) -> Option<usize> {
    if lead == b'\\' && bytes.get(at + 2) == Some(&b'{') {
        // ECMA-262 §12.9.4: one to six hex digits (more with leading zeros), then `}`.
        let digits_from = at + 3;
        let digits = bytes
            .get(digits_from..)?
            .iter()
            .take(9)
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        let close = digits_from + digits;
        if digits == 0 || digits > 8 || bytes.get(close) != Some(&b'}') {
            return None;
        }
        let c = char::from_u32(hex_digits(bytes, digits_from, digits)?)?;
        out.push(c);
        return Some(close + 1);
    }
    let unit = hex_digits(bytes, at + 2, 4)?;
    let end = at + 6;
    if let Some(c) = char::from_u32(unit) {
        out.push(c);
        return Some(end);
    }
    // A high surrogate: one character with the low surrogate escaped right after it (RFC 8259
    // §7); a lone surrogate is no character and is left as written.
    let low = (bytes.get(end) == Some(&lead) && bytes.get(end + 1) == Some(&b'u'))
        .then(|| hex_digits(bytes, end + 2, 4))
        .flatten()?;
    if !(0xD800..0xDC00).contains(&unit) || !(0xDC00..0xE000).contains(&low) {
        return None;
    }
    let c = char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))?;
    out.push(c);
    Some(end + 6)
}

/// A percent escape at `at` (which holds `%`): decoded into `out`, returning where it ends.
fn percent_escape(bytes: &[u8], at: usize, out: &mut String) -> Option<usize> {
    if matches!(bytes.get(at + 1), Some(b'u' | b'U')) {
        return unicode_escape(bytes, at, b'%', out);
    }
    byte_run(bytes, at, b"%", out)
}

/// A run of byte escapes (`%HH` or `\xHH`, `prefix` being `%` or `\x`) at `at`: the bytes
/// decoded into `out`, as UTF-8 where they are valid and as Latin-1 where not, returning where
/// the run ends.
fn byte_run(bytes: &[u8], at: usize, prefix: &[u8], out: &mut String) -> Option<usize> {
    let mut run = Vec::new();
    let mut end = at;
    while bytes.get(end..)?.starts_with(prefix) {
        let Some(byte) = hex_digits(bytes, end + prefix.len(), 2) else {
            break;
        };
        run.push(u8::try_from(byte).ok()?);
        end += prefix.len() + 2;
    }
    if run.is_empty() {
        return None;
    }
    for chunk in run.utf8_chunks() {
        out.push_str(chunk.valid());
        out.extend(chunk.invalid().iter().map(|&b| char::from(b)));
    }
    Some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn once(text: &str) -> String {
        decode_pass(text).unwrap_or_else(|| text.to_owned())
    }

    #[test]
    fn character_references() {
        assert_eq!(once("S3cr3t&#x2F;p&auml;ss&amp;x=1"), "S3cr3t/päss&x=1");
        assert_eq!(once("&#83;&#51;&#99;"), "S3c");
        assert_eq!(once("&#X53;&#x00033;&#0000099;"), "S3c");
        // Without `;`, as HTML parsers read them; named ones need theirs.
        assert_eq!(once("&#83&#x33c"), "S\u{33c}");
        assert_eq!(
            once("&amp &nbsp;&lt;&gt;&quot;&apos;&QUOT;"),
            "&amp \u{a0}<>\"'\""
        );
        assert_eq!(once("&sol;&commat;&bsol;&yuml;&Agrave;&euro;"), "/@\\ÿÀ€");
        // Not characters, or not references: left as they are.
        assert_eq!(once("&#0;"), "\0");
        for kept in [
            "&#xD800;",
            "&#x110000;",
            "&#99999999999999999999;",
            "&#;",
            "&#x;",
            "&unknown;",
            "& amp;",
            "AT&T",
        ] {
            assert_eq!(decode_pass(kept), None, "{kept}");
        }
    }

    #[test]
    fn backslash_escapes() {
        assert_eq!(once(r"S3cr3t\/p\u00e4ss"), "S3cr3t/päss");
        assert_eq!(
            once(r#"\"\\\'\b\f\n\r\t\v\0"#),
            "\"\\'\u{8}\u{c}\n\r\t\u{b}\0"
        );
        // A surrogate pair is one character; a lone surrogate is left as written.
        assert_eq!(once(r"\ud83d\uDE00!"), "\u{1F600}!");
        assert_eq!(decode_pass(r"\ud83d!"), None);
        assert_eq!(decode_pass(r"\ude00\ud83d"), None);
        assert_eq!(once(r"\u{1F600}\u{41}"), "\u{1F600}A");
        // `\xHH`: UTF-8 where the bytes are, Latin-1 where they are not.
        assert_eq!(once(r"\x41\xc3\xa4\xe4"), "Aää");
        // Not escapes: a legacy octal, an unknown letter, too few digits, a lone backslash.
        for kept in [r"\01", r"\q", r"\u12", r"\x4", r"\u{}", r"\u{110000}", "\\"] {
            assert_eq!(decode_pass(kept), None, "{kept}");
        }
    }

    #[test]
    fn percent_escapes() {
        assert_eq!(once("p%40ss%2fw%C3%A4rd"), "p@ss/wärd");
        assert_eq!(once("%E4%u00e4%uD83D%uDE00"), "ää\u{1F600}");
        // `+` stays: it may be the secret's own.
        assert_eq!(once("a+b%2Bc"), "a+b+c");
        for kept in ["%", "%4", "%G1", "100%", "%u12"] {
            assert_eq!(decode_pass(kept), None, "{kept}");
        }
    }

    #[test]
    fn one_layer_per_pass_and_every_layer_in_the_normal_form() {
        assert_eq!(once("%2541"), "%41");
        assert_eq!(once(r"\\u0041"), r"\u0041");
        assert_eq!(once("&amp;#65;"), "&#65;");
        // Percent-encoded JSON in an HTML attribute.
        let nested = "%5Cu0026amp%3B%2523x53%3B";
        assert_eq!(
            stages(nested),
            [r"\u0026amp;%23x53;", "&amp;#x53;", "&#x53;", "S"]
        );
        assert_eq!(normal_form(nested), "S");
        // The bound: a fifth layer is left.
        assert_eq!(normal_form("%2525252541"), "%41");
        assert_eq!(normal_form("plain text"), "plain text");
        assert!(stages("plain text").is_empty());
    }

    #[test]
    fn text_around_escapes_is_kept_whole() {
        assert_eq!(once("ü%20ü&lt;ü\\nü"), "ü ü<ü\nü");
        assert_eq!(once("%C3"), "\u{c3}");
    }
}
