//! How a visit's upstream exchange ended, and what each ending means to
//! the visitor (the status and body of the answer) and to the metrics
//! (its `outcome` label): stated here once, for the service that answers
//! and the metrics that count. README, "What it answers", and the
//! `gateway_upstream_requests_total` row of "Health and metrics" say the
//! same in prose.

use http::StatusCode;

/// How a visit's upstream exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered 2xx and its body was read to the end.
    Counted = 0,
    /// Refused, reset, non-2xx or garbage: answer 502.
    Failed = 1,
    /// The deadline passed while connecting or awaiting the answer: 504.
    TimedOut = 2,
    /// The deadline passed waiting for a connection at the cap: 503.
    Overloaded = 3,
}

/// Which of the configured bodies (`responses.*`) an answer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerBody {
    Welcome,
    Error,
}

impl Outcome {
    /// Every outcome, in the order [`Outcome::index`] numbers them and the
    /// metrics report them.
    pub const ALL: [Outcome; 4] = [
        Outcome::Counted,
        Outcome::Failed,
        Outcome::TimedOut,
        Outcome::Overloaded,
    ];

    /// Its place in [`Outcome::ALL`], for per-outcome arrays.
    #[inline]
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The status the visitor is answered with.
    pub const fn status(self) -> StatusCode {
        match self {
            Outcome::Counted => StatusCode::OK,
            Outcome::Failed => StatusCode::BAD_GATEWAY,
            Outcome::TimedOut => StatusCode::GATEWAY_TIMEOUT,
            Outcome::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The body the visitor is answered with.
    pub const fn body(self) -> AnswerBody {
        match self {
            Outcome::Counted => AnswerBody::Welcome,
            Outcome::Failed | Outcome::TimedOut | Outcome::Overloaded => AnswerBody::Error,
        }
    }

    /// The `retry-after` the answer carries, in seconds: only an overloaded
    /// gateway asks the visitor to come back, as nothing was sent.
    pub const fn retry_after(self) -> Option<&'static str> {
        match self {
            Outcome::Overloaded => Some("1"),
            Outcome::Counted | Outcome::Failed | Outcome::TimedOut => None,
        }
    }

    /// The value of the `outcome` label on the upstream metrics.
    pub const fn label(self) -> &'static str {
        match self {
            Outcome::Counted => "ok",
            Outcome::Failed => "error",
            Outcome::TimedOut => "timeout",
            Outcome::Overloaded => "overloaded",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_sits_at_its_index() {
        for (index, outcome) in Outcome::ALL.into_iter().enumerate() {
            assert_eq!(outcome.index(), index, "{outcome:?}");
        }
    }
}
