//! One timer per connection for every deadline it has, re-armed lazily:
//! a deadline further off than the one armed leaves the timer as it is
//! until it fires (the `phase` module says why the server keeps its
//! timeouts itself).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use backends::Runtime;
use hyper::rt::Timer;

/// A connection's timer.
pub(super) struct Alarm<R: Runtime> {
    timer: R::Timer,
    sleep: Pin<Box<dyn hyper::rt::Sleep>>,
    /// When the sleep fires; `None` once it has fired (a fired sleep may
    /// never fire again until it is reset).
    armed: Option<Instant>,
}

impl<R: Runtime> Alarm<R> {
    /// A timer armed for `first`.
    pub(super) fn new(first: Instant) -> Self {
        let timer = R::timer();
        let sleep = timer.sleep_until(first);
        Self {
            timer,
            sleep,
            armed: Some(first),
        }
    }

    /// Waits for the earliest of `deadlines`: ready with the index of the
    /// first one passed; pending for ever when none is given.
    pub(super) fn wait_for(
        &mut self,
        cx: &mut Context<'_>,
        deadlines: [Option<Instant>; 2],
    ) -> Poll<usize> {
        loop {
            let Some(next) = deadlines.iter().flatten().min().copied() else {
                return Poll::Pending;
            };
            if self.armed.is_none_or(|armed| next < armed) {
                self.timer.reset(&mut self.sleep, next);
                self.armed = Some(next);
            }
            match self.sleep.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => {
                    self.armed = None;
                    let now = Instant::now();
                    if let Some(passed) = deadlines.iter().position(|d| d.is_some_and(|d| now >= d))
                    {
                        return Poll::Ready(passed);
                    }
                    // Fired for an earlier deadline; wait for these.
                }
            }
        }
    }
}
