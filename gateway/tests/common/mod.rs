//! Test harness: the real `gateway` binary in a child process, a real
//! `gateway counter` ([`process`]), a scripted upstream served by hyper or
//! raw sockets in the test process ([`scripted_upstream`]), and real HTTP
//! clients ([`client`]); waiting for what happens in time
//! ([`eventually`]), and tools a test needs ([`require`]).
//!
//! Every behavioural test is one `async fn(Backend)` run once per backend
//! by [`both_backends!`].
#![allow(dead_code)]

pub mod client;
pub mod eventually;
pub mod h2;
pub mod netns;
pub mod postgres;
pub mod process;
pub mod require;
pub mod scripted_upstream;
pub mod tls;

// Each test file uses some of these, none all.
#[allow(unused_imports)]
pub use client::*;
#[allow(unused_imports)]
pub use eventually::{Text, at_least, eventually, eventually_blocking, within};
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use scripted_upstream::*;

/// The backends every behavioural test runs on, and the threading modes.
pub use gateway::config::{Backend, Threading};

/// The backend after `backend` in the backends crate's list, for a test
/// that switches a running service from one to another.
pub fn other_backend(backend: Backend) -> Backend {
    use gateway::config::Named;
    let next = Backend::ALL
        .iter()
        .position(|&b| b == backend)
        .map_or(0, |i| i + 1);
    Backend::ALL[next % Backend::ALL.len()]
}

/// Runs each listed `async fn(Backend)` as one test per backend,
/// `NAME::tokio` and `NAME::smol`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(backends::for_every_backend!(on_every_backend!($name));)*
    };
}

/// `name::backend` for every backend the backends crate lists.
#[macro_export]
macro_rules! on_every_backend {
    ($name:ident ; $([$runtime:path, $variant:path, $backend:ident])*) => {
        mod $name {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $backend() {
                    super::$name($variant).await
                }
            )*
        }
    };
}
