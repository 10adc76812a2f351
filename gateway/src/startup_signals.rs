//! The signals that arrive while the daemon starts.
//!
//! The runtime catches the daemon's signals once it runs, and start-up can
//! take seconds before that: the store is opened first, and a database that
//! does not answer yet holds it. Until then SIGHUP, SIGUSR1, SIGUSR2 and
//! SIGALRM would end the process by their default action (a
//! `systemctl reload` during a slow start would kill the service), and
//! SIGXFSZ would kill it while it creates its state file instead of
//! failing the write with `EFBIG`, which the store reports.
//!
//! So `main` catches them first thing, only noting which came. Once the
//! runtime's own handlers are in place, the daemon takes the note
//! ([`StartupSignals::take`]) and acts on each signal as if it had come
//! then. SIGTERM and SIGINT keep their default action until the runtime
//! catches them: during start-up they ask for what it does, the end of the
//! process.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use backends::Signal;
use signal_hook::SigId;
use signal_hook::consts::signal::{SIGALRM, SIGHUP, SIGUSR1, SIGUSR2, SIGXFSZ};

/// The signals caught before the runtime runs, and which of them came.
pub struct StartupSignals {
    caught: Vec<Caught>,
}

struct Caught {
    signal: Signal,
    came: Arc<AtomicBool>,
    id: SigId,
}

impl StartupSignals {
    /// Catches, from now on, every signal whose default action would end
    /// the process and that does not ask for that.
    pub fn catch() -> io::Result<Self> {
        let mut caught = Vec::new();
        for (signal, number) in [
            (Signal::Hangup, SIGHUP),
            (Signal::User1, SIGUSR1),
            (Signal::User2, SIGUSR2),
            (Signal::Alarm, SIGALRM),
            (Signal::FileSizeLimit, SIGXFSZ),
        ] {
            let came = Arc::new(AtomicBool::new(false));
            let id = signal_hook::flag::register(number, came.clone())?;
            caught.push(Caught { signal, came, id });
        }
        Ok(Self { caught })
    }

    /// Stops noting signals, which the runtime's handlers must catch by
    /// now, and returns those that came, each once however often it came.
    /// One that comes while the runtime's handlers are being set up may be
    /// both noted here and caught by them: it is then acted on twice,
    /// which for a reload means reading the same file again.
    pub fn take(self) -> Vec<Signal> {
        self.caught
            .into_iter()
            .filter_map(|caught| {
                signal_hook::low_level::unregister(caught.id);
                caught.came.load(Ordering::SeqCst).then_some(caught.signal)
            })
            .collect()
    }
}
