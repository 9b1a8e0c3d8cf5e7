//! When to refresh a token and how long to wait after a failure: pure functions of durations
//! and a jitter value in `[0, 1)`, so they are tested without a clock or randomness.

use std::time::Duration;

/// A token is refreshed at this fraction of its lifetime, plus up to [`REFRESH_JITTER`] more,
/// so that sidecars started together spread their token requests (linkerd's identity client
/// refreshes at 70% for the same reasons).
pub const REFRESH_FRACTION: f64 = 0.70;
/// Extra fraction of the lifetime, scaled by the jitter value.
pub const REFRESH_JITTER: f64 = 0.10;
/// Shortest time between a successful fetch and the next, for long enough tokens.
pub const MIN_REFRESH_DELAY: Duration = Duration::from_secs(5);
/// Longest time between a successful fetch and the next, however long the token lives, so a
/// token revoked at the server is replaced within this bound.
pub const MAX_REFRESH_DELAY: Duration = Duration::from_secs(12 * 3600);
/// A token is no longer sent this long before it expires (or a tenth of its lifetime, if
/// less), so that a request in flight, or a clock a little ahead at the upstream, does not
/// see it expire.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(30);
/// Longest `Retry-After` honoured from a token endpoint; a larger one is taken as this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// How long after it arrives a token with `lifetime` may be sent.
pub fn usable_for(lifetime: Duration) -> Duration {
    lifetime - EXPIRY_MARGIN.min(lifetime / 10)
}

/// How long after a successful fetch to fetch again.
///
/// Always shorter than [`usable_for`], leaving at least a tenth of that time for the refresh
/// and its retries; otherwise between [`MIN_REFRESH_DELAY`] and [`MAX_REFRESH_DELAY`].
pub fn refresh_delay(lifetime: Duration, jitter: f64) -> Duration {
    let jitter = jitter.clamp(0.0, 1.0);
    let target = lifetime.mul_f64(REFRESH_FRACTION + REFRESH_JITTER * jitter);
    let latest = usable_for(lifetime).mul_f64(0.9);
    target
        .clamp(MIN_REFRESH_DELAY, MAX_REFRESH_DELAY)
        .min(latest)
}

/// Wait before the next try after `failures` consecutive failed fetches (1 for the first).
///
/// Exponential with full jitter (uniform up to `base · 2^(failures-1)`, capped at `cap`), but
/// never below `base`, so that even unlucky draws cannot make a tight loop. A server's
/// `Retry-After` is honoured when it asks for longer, up to [`MAX_RETRY_AFTER`].
pub fn backoff(
    failures: u32,
    base: Duration,
    cap: Duration,
    jitter: f64,
    retry_after: Option<Duration>,
) -> Duration {
    let exponent = failures.saturating_sub(1).min(31);
    let ceiling = base.saturating_mul(1u32 << exponent).min(cap).max(base);
    let drawn = base + (ceiling - base).mul_f64(jitter.clamp(0.0, 1.0));
    match retry_after {
        Some(asked) => drawn.max(asked.min(MAX_RETRY_AFTER)),
        None => drawn,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn refresh_at_seventy_to_eighty_percent() {
        assert_eq!(refresh_delay(secs(3600), 0.0), secs(2520));
        assert_eq!(refresh_delay(secs(3600), 1.0), secs(2880));
        let mid = refresh_delay(secs(899), 0.5);
        assert!(mid > secs(629) && mid < secs(720), "{mid:?}");
    }

    #[test]
    fn refresh_is_clamped() {
        assert_eq!(refresh_delay(secs(86400 * 7), 0.0), MAX_REFRESH_DELAY);
        // 10 s token: 70% would be 7 s, inside the bounds.
        assert_eq!(refresh_delay(secs(10), 0.0), secs(7));
        // 4 s token: 5 s minimum would be past expiry, so the expiry bound wins.
        let short = refresh_delay(secs(4), 0.0);
        assert!(short < usable_for(secs(4)), "{short:?}");
    }

    #[test]
    fn refresh_always_before_the_token_stops_being_usable() {
        for lifetime in [1, 2, 5, 9, 30, 60, 299, 300, 899, 3600, 86400] {
            for jitter in [0.0, 0.3, 0.99, 1.0] {
                let delay = refresh_delay(secs(lifetime), jitter);
                assert!(
                    delay < usable_for(secs(lifetime)),
                    "lifetime {lifetime}, jitter {jitter}: {delay:?}"
                );
            }
        }
    }

    #[test]
    fn margin_is_small() {
        assert_eq!(usable_for(secs(3600)), secs(3570));
        assert_eq!(usable_for(secs(100)), secs(90));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let b = |failures, jitter| backoff(failures, secs(1), secs(60), jitter, None);
        assert_eq!(b(1, 1.0), secs(1));
        assert_eq!(b(2, 1.0), secs(2));
        assert_eq!(b(4, 1.0), secs(8));
        assert_eq!(b(30, 1.0), secs(60));
        assert_eq!(b(u32::MAX, 1.0), secs(60));
        // Never below the base, however low the draw.
        assert_eq!(b(10, 0.0), secs(1));
    }

    #[test]
    fn backoff_honours_retry_after_within_bounds() {
        let b = |asked| backoff(1, secs(1), secs(60), 0.0, Some(asked));
        assert_eq!(b(secs(30)), secs(30));
        assert_eq!(b(Duration::ZERO), secs(1));
        assert_eq!(b(secs(86400)), MAX_RETRY_AFTER);
    }
}
