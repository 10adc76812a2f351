//! One shape written once: a stream type whose IO methods hand the call,
//! unchanged, to a stream it holds. Five of the gateway's streams have
//! such methods (a backend's stream over its runtime's, the two TLS
//! adapters, the server's watched stream, the upstream's plain-or-TLS
//! stream); [`pass_through!`](crate::pass_through) writes them, inside
//! the trait's `impl` block, beside the methods that do more.

/// Writes IO methods that pass their call to a field of `self`, or to the
/// stream inside whichever variant `self` is, inside an `impl` block of
/// hyper's `Read`/`Write` or futures-io's `AsyncWrite`:
///
/// ```ignore
/// impl<S: Write + Unpin> Write for Watched<S> {
///     backends::pass_through!(self.inner => poll_write, poll_write_vectored);
///     // ...the methods that do more...
/// }
/// impl<S: Stream> Write for Either<S> {
///     backends::pass_through!(match Plain | Tls => poll_write, poll_flush);
/// }
/// ```
///
/// `outer = inner` calls a method of another name: hyper's
/// `poll_shutdown` is futures-io's `poll_close`. The methods are
/// `poll_read` (hyper's, with its cursor), `poll_write`,
/// `poll_write_vectored`, `is_write_vectored`, `poll_flush`,
/// `poll_shutdown` and `poll_close`. The called trait must be in scope
/// where the macro is used, as for a call written out.
#[macro_export]
macro_rules! pass_through {
    (self.$field:ident => $($methods:tt)+) => {
        $crate::pass_through!(@each [field $field] $($methods)+);
    };
    (match $($variant:ident)|+ => $($methods:tt)+) => {
        $crate::pass_through!(@each [variants $($variant)+] $($methods)+);
    };

    (@each $via:tt $($method:ident $(= $inner:ident)?),+ $(,)?) => {
        $( $crate::pass_through!(@method $via $method $($inner)?); )+
    };

    (@method $via:tt $method:ident) => {
        $crate::pass_through!(@method $via $method $method);
    };
    (@method $via:tt poll_read $inner:ident) => {
        fn poll_read(
            self: ::core::pin::Pin<&mut Self>,
            cx: &mut ::core::task::Context<'_>,
            buf: $crate::__hyper::rt::ReadBufCursor<'_>,
        ) -> ::core::task::Poll<::std::io::Result<()>> {
            $crate::pass_through!(@pinned $via self $inner(cx, buf))
        }
    };
    (@method $via:tt poll_write $inner:ident) => {
        fn poll_write(
            self: ::core::pin::Pin<&mut Self>,
            cx: &mut ::core::task::Context<'_>,
            buf: &[u8],
        ) -> ::core::task::Poll<::std::io::Result<usize>> {
            $crate::pass_through!(@pinned $via self $inner(cx, buf))
        }
    };
    (@method $via:tt poll_write_vectored $inner:ident) => {
        fn poll_write_vectored(
            self: ::core::pin::Pin<&mut Self>,
            cx: &mut ::core::task::Context<'_>,
            bufs: &[::std::io::IoSlice<'_>],
        ) -> ::core::task::Poll<::std::io::Result<usize>> {
            $crate::pass_through!(@pinned $via self $inner(cx, bufs))
        }
    };
    (@method $via:tt is_write_vectored $inner:ident) => {
        fn is_write_vectored(&self) -> bool {
            $crate::pass_through!(@shared $via self $inner())
        }
    };
    (@method $via:tt poll_flush $inner:ident) => {
        fn poll_flush(
            self: ::core::pin::Pin<&mut Self>,
            cx: &mut ::core::task::Context<'_>,
        ) -> ::core::task::Poll<::std::io::Result<()>> {
            $crate::pass_through!(@pinned $via self $inner(cx))
        }
    };
    (@method $via:tt poll_shutdown $inner:ident) => {
        fn poll_shutdown(
            self: ::core::pin::Pin<&mut Self>,
            cx: &mut ::core::task::Context<'_>,
        ) -> ::core::task::Poll<::std::io::Result<()>> {
            $crate::pass_through!(@pinned $via self $inner(cx))
        }
    };
    (@method $via:tt poll_close $inner:ident) => {
        fn poll_close(
            self: ::core::pin::Pin<&mut Self>,
            cx: &mut ::core::task::Context<'_>,
        ) -> ::core::task::Poll<::std::io::Result<()>> {
            $crate::pass_through!(@pinned $via self $inner(cx))
        }
    };

    // The call on the held stream, pinned (every stream here is `Unpin`).
    (@pinned [field $field:ident] $this:ident $inner:ident $args:tt) => {
        ::core::pin::Pin::new(&mut $this.get_mut().$field).$inner $args
    };
    (@pinned [variants $($variant:ident)+] $this:ident $inner:ident $args:tt) => {
        match $this.get_mut() {
            $( Self::$variant(stream) => ::core::pin::Pin::new(stream).$inner $args, )+
        }
    };
    // The call on the held stream, by shared reference.
    (@shared [field $field:ident] $this:ident $inner:ident $args:tt) => {
        $this.$field.$inner $args
    };
    (@shared [variants $($variant:ident)+] $this:ident $inner:ident $args:tt) => {
        match $this {
            $( Self::$variant(stream) => stream.$inner $args, )+
        }
    };
}
