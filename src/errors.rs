//! Error text shared by every part: an error and its causes on one line.

use std::error::Error;

/// An error and its causes on one line: hyper's top-level messages ("client error (Connect)")
/// say little without the cause ("connection refused", "invalid peer certificate"). A cause
/// whose text its parent already ends with is not repeated.
pub(crate) fn chain(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("client error (Connect)")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("cannot connect: refused")]
    struct Repeats(#[source] Refused);

    #[derive(Debug, thiserror::Error)]
    #[error("refused")]
    struct Refused;

    #[test]
    fn causes_follow_their_error_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        assert_eq!(
            chain(&Outer(io)),
            "client error (Connect): connection refused"
        );
        assert_eq!(chain(&Repeats(Refused)), "cannot connect: refused");
    }
}
