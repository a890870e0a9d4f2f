//! Accepting connections without spinning when `accept` fails.
//!
//! Out of file descriptors, a pending connection stays in the listen backlog and `accept`
//! fails again at once: retrying without a pause spins a core and logs nothing. Both of the
//! gateway's listeners (its Unix socket and the WebSocket bridge's TCP socket) accept through
//! [`Accepting`], which backs off while `accept` fails and warns once per episode.

use std::io;
use std::task::{Context, Poll};
use std::time::Duration;

/// Where connections come from (a trait so tests can make accepting fail).
pub(crate) trait Listen {
    type Conn;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Conn>>;
}

impl Listen for tokio::net::TcpListener {
    type Conn = (tokio::net::TcpStream, std::net::SocketAddr);
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Conn>> {
        tokio::net::TcpListener::poll_accept(self, cx)
    }
}

impl Listen for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Conn>> {
        tokio::net::UnixListener::poll_accept(self, cx).map_ok(|(s, _)| s)
    }
}

/// First and longest pause after `accept` fails.
pub(crate) const ACCEPT_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(5), Duration::from_millis(200));

/// How often a lasting failure to accept is logged.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(60);

/// Accepts connections, backing off while `accept` fails (5 ms, doubling to 200 ms). Failures
/// are logged once per episode: again only after [`ACCEPT_LOG_EVERY`] (connections ending in
/// between let a few through, and that is not the end of the shortage).
pub(crate) struct Accepting<L> {
    pub(crate) listener: L,
    /// Which listener, for the log.
    what: &'static str,
    /// While failing: when to try again, and the next pause.
    retry: Option<(tokio::time::Instant, Duration)>,
    /// Failures since the last warning.
    failures: u64,
    warned: Option<tokio::time::Instant>,
}

impl<L: Listen> Accepting<L> {
    pub(crate) fn new(listener: L, what: &'static str) -> Self {
        Accepting {
            listener,
            what,
            retry: None,
            failures: 0,
            warned: None,
        }
    }

    /// Tries again without waiting out the pause (a connection ended, freeing its descriptor).
    pub(crate) fn retry_now(&mut self) {
        if let Some((at, _)) = &mut self.retry {
            *at = tokio::time::Instant::now();
        }
    }

    /// The next connection. Cancel-safe: the pause is kept in `self`.
    pub(crate) async fn next(&mut self) -> L::Conn {
        loop {
            if let Some((at, _)) = self.retry {
                tokio::time::sleep_until(at).await;
            }
            match std::future::poll_fn(|cx| self.listener.poll_accept(cx)).await {
                Ok(c) => {
                    self.retry = None;
                    return c;
                }
                Err(e) => {
                    let now = tokio::time::Instant::now();
                    self.failures += 1;
                    if self.warned.is_none_or(|w| now - w >= ACCEPT_LOG_EVERY) {
                        crate::log::warn(format_args!(
                            "{}: accepting connections fails: {e} ({} times since the last warning; retrying every {} ms at most)",
                            self.what,
                            self.failures,
                            ACCEPT_BACKOFF.1.as_millis()
                        ));
                        self.warned = Some(now);
                        self.failures = 0;
                    }
                    let pause = self.retry.map_or(ACCEPT_BACKOFF.0, |(_, p)| p);
                    self.retry = Some((now + pause, (pause * 2).min(ACCEPT_BACKOFF.1)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener whose `accept` fails `left` times (as with no file descriptors left), then
    /// waits forever; it records when each attempt was made.
    struct Failing {
        left: std::cell::Cell<u32>,
        attempts: std::cell::RefCell<Vec<tokio::time::Instant>>,
    }

    impl Listen for Failing {
        type Conn = ();
        fn poll_accept(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            if self.left.get() == 0 {
                return Poll::Pending;
            }
            self.left.set(self.left.get() - 1);
            self.attempts.borrow_mut().push(tokio::time::Instant::now());
            Poll::Ready(Err(io::Error::from_raw_os_error(24))) // EMFILE
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failing_accepts_back_off_instead_of_spinning() {
        let failing = Failing {
            left: std::cell::Cell::new(12),
            attempts: Default::default(),
        };
        let mut acc = Accepting::new(failing, "test");
        // The clock is paused: this returns once every attempt was made and the listener waits.
        let r = tokio::time::timeout(Duration::from_secs(3600), acc.next()).await;
        assert!(r.is_err());
        let at = acc.listener.attempts.borrow();
        assert_eq!(at.len(), 12);
        let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        for pair in gaps.windows(2) {
            assert!(pair[0] <= pair[1], "{gaps:?}");
        }
        assert!(
            gaps[0] >= ACCEPT_BACKOFF.0 && gaps[gaps.len() - 1] == ACCEPT_BACKOFF.1,
            "{gaps:?}"
        );
        assert_eq!(acc.failures, 11, "one warning");
    }
}
