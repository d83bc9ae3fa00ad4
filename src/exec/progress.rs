//! Progress of a long stage: an indicatif bar on a terminal; on anything else (CI logs, files) a
//! plain line at most every few seconds, so logs stay readable.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

const PLAIN_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    stage: String,
    unit: String,
    total: u64,
    done: u64,
    bar: Option<ProgressBar>,
    started: Instant,
    last_line: Instant,
    message: String,
}

impl Progress {
    pub fn new(stage: &str, total: u64, unit: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "  {prefix} [{bar:30}] {pos}/{len} {msg} ({per_sec}, eta {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(stage.to_string());
            bar
        });
        let now = Instant::now();
        Self {
            stage: stage.into(),
            unit: unit.into(),
            total,
            done: 0,
            bar,
            started: now,
            last_line: now,
            message: String::new(),
        }
    }

    /// Advances by `n` units; `message` (e.g. a running accuracy) is shown beside the count.
    pub fn advance(&mut self, n: u64, message: String) {
        self.done += n;
        match &self.bar {
            Some(bar) => {
                bar.set_message(message);
                bar.inc(n);
            }
            None => {
                self.message = message;
                if self.last_line.elapsed() >= PLAIN_EVERY || self.done == self.total {
                    self.last_line = Instant::now();
                    self.print_line();
                }
            }
        }
    }

    /// Prints a warning above the bar (or as a plain line), without disturbing it.
    pub fn warn(&self, message: &str) {
        let text = format!("  warning: {}: {message}", self.stage);
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{text}")),
            None => eprintln!("{text}"),
        }
    }

    fn print_line(&self) {
        let secs = self.started.elapsed().as_secs_f64();
        let rate = self.done as f64 / secs.max(1e-9);
        let eta = (self.total.saturating_sub(self.done)) as f64 / rate.max(1e-9);
        eprintln!(
            "  {} {}/{} {} {} ({rate:.2} {}/s, eta {eta:.0}s)",
            self.stage, self.done, self.total, self.unit, self.message, self.unit
        );
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
