//! Bodies on their way through: the app's request body under an idle deadline, its failures
//! told apart from the upstream's, and the memory budget for bodies kept for a 401 replay.
//!
//! An app's body is untrusted in its timing as in its bytes: a `Content-Length: 1000` with no
//! body would otherwise hold its connection, and the memory read so far, for ever. [`AppBody`]
//! ends it after `body_idle_timeout` without progress. When it fails, the error carries an
//! [`AppBodyError`] through hyper's client, so that the app gets 408 or 400 and the upstream is
//! not blamed (no 502, nothing for the upstream-error alerts).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Body of an answer to the app: the upstream's, streamed, or bearerd's own error JSON.
pub(crate) type ResponseBody = Either<Incoming, Full<Bytes>>;
/// Body of a request to the upstream: the app's, streamed, or kept whole for a replay.
pub(crate) type RequestBody = Either<AppBody, Full<Bytes>>;

/// Why the app's request body could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AppBodyError {
    /// No byte arrived for the idle timeout.
    #[error("the request body made no progress for {}", humantime::format_duration(*.0))]
    Stalled(Duration),
    /// Broken framing (a chunk size that overflows, say) or a connection that ended early.
    #[error("the request body is malformed or cut short: {0}")]
    Malformed(#[source] hyper::Error),
}

impl AppBodyError {
    /// The app's body error somewhere in `error`'s chain of causes, if it is one.
    pub(crate) fn find<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Self> {
        let mut current = Some(error);
        while let Some(e) = current {
            if let Some(found) = e.downcast_ref::<Self>() {
                return Some(found);
            }
            current = e.source();
        }
        None
    }
}

/// The app's request body, ended with [`AppBodyError::Stalled`] when it makes no progress for
/// its idle timeout.
pub(crate) struct AppBody {
    inner: Incoming,
    idle_timeout: Duration,
    /// Made at the first wait, and pushed back whenever a frame arrives: a body that arrives
    /// in one piece (the common case) never needs one.
    deadline: Option<Pin<Box<Sleep>>>,
    /// A frame arrived since the deadline was last set.
    progressed: bool,
}

impl AppBody {
    /// Wraps `inner` with `idle_timeout`.
    pub(crate) fn new(inner: Incoming, idle_timeout: Duration) -> Self {
        Self {
            inner,
            idle_timeout,
            deadline: None,
            progressed: false,
        }
    }

    /// The whole body, if it arrives in time and is well framed.
    pub(crate) async fn collect(self) -> Result<Bytes, AppBodyError> {
        let collected = http_body_util::BodyExt::collect(self).await?;
        Ok(collected.to_bytes())
    }
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = AppBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.progressed = true;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(AppBodyError::Malformed(error)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let idle_timeout = this.idle_timeout;
                let deadline = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle_timeout)));
                if std::mem::take(&mut this.progressed) {
                    deadline.as_mut().reset(Instant::now() + idle_timeout);
                }
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(AppBodyError::Stalled(idle_timeout)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The memory all listeners together may hold in request bodies kept for a replay
/// (`[server] replay_memory`): one permit per byte.
#[derive(Debug, Clone)]
pub(crate) struct ReplayBudget(Arc<Semaphore>);

impl ReplayBudget {
    /// A budget of `bytes`.
    pub(crate) fn new(bytes: usize) -> Self {
        Self(Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS))))
    }

    /// Room for a body of `bytes`, held until the returned permit is dropped; `None` when the
    /// budget is spent (the request then streams, without a replay).
    pub(crate) fn reserve(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let bytes = u32::try_from(bytes).ok()?;
        Arc::clone(&self.0).try_acquire_many_owned(bytes).ok()
    }

    /// Bytes not reserved now.
    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        self.0.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_shared_and_given_back() {
        let budget = ReplayBudget::new(100);
        let first = budget.reserve(60).unwrap();
        assert!(budget.reserve(60).is_none(), "over the budget");
        let shared = budget.clone();
        let second = shared.reserve(40).unwrap();
        assert_eq!(budget.available(), 0);
        drop(first);
        drop(second);
        assert_eq!(budget.available(), 100);
        assert!(budget.reserve(u64::MAX).is_none());
    }
}
