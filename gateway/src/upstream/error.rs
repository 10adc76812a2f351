//! Why an upstream client could not be built, at start or on a reload.

/// Why [`Upstream::new`](super::Upstream::new) failed; the message names
/// the upstream as configured (the daemon escapes it).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// `upstream.url` is not one the client can use: the URL parser's
    /// message.
    #[error("{0}")]
    Url(String),
    /// An `https://` upstream, and no TLS client settings to reach it with.
    #[error("upstream {authority} is https, and no TLS settings were given for it")]
    NoTls { authority: String },
    /// The upstream's name resolved to no address, or could not be looked up.
    #[error("cannot resolve upstream {authority}: {source}")]
    Resolve {
        authority: String,
        source: std::io::Error,
    },
}
