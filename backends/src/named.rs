//! The backends, and the ways to thread one, by name: the one list that
//! the gateway's configuration and command line, its tests and the bench
//! choose from, and the one place a name becomes a runtime type
//! ([`Backend::run`]).

use crate::{Runtime, Smol, Threading, Tokio};

/// A choice made by name in a configuration: `runtime.backend = "smol"`.
pub trait Named: Copy + Sized + 'static {
    /// Every choice, the default first.
    const ALL: &'static [Self];
    /// Their names, in the same order.
    const NAMES: &'static [&'static str];

    fn name(self) -> &'static str;

    fn from_name(name: &str) -> Option<Self> {
        let index = Self::NAMES.iter().position(|known| *known == name)?;
        Self::ALL.get(index).copied()
    }
}

/// Which async runtime runs the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    #[default]
    Tokio,
    Smol,
}

impl Named for Backend {
    const ALL: &'static [Self] = &[Backend::Tokio, Backend::Smol];
    const NAMES: &'static [&'static str] = &[Tokio::NAME, Smol::NAME];

    fn name(self) -> &'static str {
        match self {
            Backend::Tokio => Tokio::NAME,
            Backend::Smol => Smol::NAME,
        }
    }
}

/// Work written over the runtime trait, for [`Backend::run`] to run.
pub trait OnRuntime {
    type Output;
    fn run<R: Runtime>(self) -> Self::Output;
}

impl Backend {
    /// The name `runtime.backend` gives it (its runtime's [`Runtime::NAME`]).
    pub fn name(self) -> &'static str {
        Named::name(self)
    }

    /// Runs `work` on this backend's runtime type.
    pub fn run<W: OnRuntime>(self, work: W) -> W::Output {
        match self {
            Backend::Tokio => work.run::<Tokio>(),
            Backend::Smol => work.run::<Smol>(),
        }
    }
}

impl Threading {
    /// The name `runtime.threading` gives it.
    pub fn name(self) -> &'static str {
        Named::name(self)
    }
}

impl Named for Threading {
    const ALL: &'static [Self] = &[Threading::PerCore, Threading::Shared];
    const NAMES: &'static [&'static str] = &["per-core", "shared"];

    fn name(self) -> &'static str {
        match self {
            Threading::Shared => "shared",
            Threading::PerCore => "per-core",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trips<T: Named + PartialEq + Default + std::fmt::Debug>() {
        assert_eq!(T::ALL.len(), T::NAMES.len());
        assert_eq!(T::ALL[0], T::default());
        for &choice in T::ALL {
            assert_eq!(T::from_name(choice.name()), Some(choice));
        }
        assert_eq!(T::from_name("glommio"), None);
    }

    #[test]
    fn every_backend_and_threading_is_found_by_its_name() {
        round_trips::<Backend>();
        round_trips::<Threading>();
    }

    /// `for_every_backend!` and `Backend::ALL` list the same backends.
    #[test]
    fn the_test_list_is_the_registry() {
        macro_rules! listed {
            ( ; $([$runtime:path, $variant:path, $backend:ident])*) => {
                vec![$((<$runtime as Runtime>::NAME, $variant, stringify!($backend))),*]
            };
        }
        let listed = crate::for_every_backend!(listed!());
        let registry: Vec<_> = Backend::ALL
            .iter()
            .map(|&b| (b.name(), b, b.name()))
            .collect();
        assert_eq!(listed, registry);
    }
}
