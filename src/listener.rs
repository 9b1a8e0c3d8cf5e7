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
