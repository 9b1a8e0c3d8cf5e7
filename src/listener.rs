//! Plumbing shared by the proxy and admin listeners.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Wait after a failed `accept` (such as running out of file descriptors) before the next, so
/// that the loop does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The next connection on `listener`, or `None` once `shutdown` is cancelled. A failed accept
/// is logged under `name` and tried again after a pause.
pub(crate) async fn accept(
    listener: &TcpListener,
    name: &str,
    shutdown: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => return Some(accepted),
                Err(error) => {
                    tracing::warn!(listener = %name, %error, "accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                        () = shutdown.cancelled() => return None,
                    }
                }
            },
            () = shutdown.cancelled() => return None,
        }
    }
}

/// Whether a peer at `ip` is in `allow_from` (`None`: every peer is).
pub(crate) fn admits(allow_from: Option<&[ipnet::IpNet]>, ip: std::net::IpAddr) -> bool {
    // A listener on `[::]` sees IPv4 peers as `::ffff:a.b.c.d`.
    let ip = ip.to_canonical();
    allow_from.map_or(true, |networks| {
        networks.iter().any(|net| net.contains(&ip))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_the_networks_listed_and_mapped_ipv4() {
        let networks: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let admits = |ip: &str| admits(Some(&networks), ip.parse().unwrap());
        assert!(admits("10.1.2.3"));
        assert!(admits("::ffff:10.1.2.3"));
        assert!(!admits("127.0.0.1"));
        assert!(!admits("192.168.0.1"));
        assert!(super::admits(None, "192.168.0.1".parse().unwrap()));
    }
}
