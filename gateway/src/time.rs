//! Deadlines over the runtime trait's timer.

use std::future::Future;
use std::time::Instant;

use backends::Runtime;

/// The deadline passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Runs `future` until `deadline`; whichever finishes first wins.
pub async fn timeout_at<R: Runtime, F: Future>(
    deadline: Instant,
    future: F,
) -> Result<F::Output, Elapsed> {
    futures_lite::future::or(async { Ok(future.await) }, async {
        R::sleep_until(deadline).await;
        Err(Elapsed)
    })
    .await
}
