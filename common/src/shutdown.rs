//! Cooperative shutdown.
//!
//! Servers own their sockets on one thread and poll with a short timeout; between polls they
//! check a [`Shutdown`] flag. `main` wires SIGINT/SIGTERM to the flag (through
//! `signal-hook`), tests trigger it directly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often a server loop looks at the flag: the longest a shutdown waits (100 ms).
pub const SHUTDOWN_POLL: Duration = Duration::from_millis(100);

/// A cloneable shutdown flag. All clones share one flag.
#[derive(Debug, Clone, Default)]
pub struct Shutdown(Arc<AtomicBool>);

impl Shutdown {
    /// A flag that is not set.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Sets the flag; every clone sees it.
    pub fn trigger(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether the flag is set.
    pub fn is_triggered(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// The shared flag, for `signal_hook::flag::register`.
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.0)
    }

    /// A flag that SIGINT and SIGTERM set (through `signal-hook`), for a server's `main`.
    ///
    /// # Errors
    /// The handlers could not be installed.
    pub fn on_signals() -> std::io::Result<Shutdown> {
        let shutdown = Shutdown::new();
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(signal, shutdown.flag())?;
        }
        Ok(shutdown)
    }
}
