//! Ctrl-C handling: the first press asks running stages to stop at their next check (outputs of
//! finished stages are kept, the unfinished one is discarded); the second press exits at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Clone, Default)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    /// An interrupt flag wired to Ctrl-C (SIGINT). Installing twice in one process is
    /// harmless: the second handler is simply not installed and the flag stays manual.
    pub fn install() -> Self {
        let flag = Self::default();
        let inner = flag.0.clone();
        let _ = ctrlc::set_handler(move || {
            if inner.swap(true, Ordering::SeqCst) {
                eprintln!("\ninterrupted twice: exiting now");
                std::process::exit(130);
            }
            eprintln!(
                "\ninterrupt: stopping after the current step (press Ctrl-C again to exit now)"
            );
        });
        flag
    }

    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}
