//! `GET /metrics`: the server's counters, gauges and latency histograms in Prometheus' text
//! format (version 0.0.4), as vLLM and TGI expose theirs.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Latency buckets (seconds), from one decoding step on a small model to a long prompt.
const BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default)]
pub struct Metrics {
    /// Requests answered, by model asked for and HTTP status.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Requests by the expert that answered them (`base` for the base model).
    experts: Mutex<BTreeMap<String, u64>>,
    /// Requests accepted and not yet taken into the batch.
    pub queued: AtomicUsize,
    /// Sequences in the decode batch after the last step.
    pub batch: AtomicUsize,
    tokens: AtomicU64,
    /// Prompt tokens prefilled, and of them those the prefix cache answered (set from the
    /// decoder's running totals).
    pub prompt_tokens: AtomicU64,
    pub cached_prompt_tokens: AtomicU64,
    time_to_first_token: Histogram,
    inter_token: Histogram,
    first_pass: Histogram,
}

#[derive(Default)]
struct Histogram(Mutex<HistogramData>);

#[derive(Default)]
struct HistogramData {
    /// Observations at or below each of [`BOUNDS`] (not cumulative).
    buckets: [u64; BOUNDS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let seconds = d.as_secs_f64();
        let mut h = locked(&self.0);
        if let Some(i) = BOUNDS.iter().position(|&b| seconds <= b) {
            h.buckets[i] += 1;
        }
        h.count += 1;
        h.sum += seconds;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let h = locked(&self.0);
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in BOUNDS.iter().zip(h.buckets) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", h.sum, h.count);
    }
}

/// The data behind `m`, also after a thread panicked holding it (counters stay usable).
fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A counter family: its help and type lines, then a line per label set.
fn counter(out: &mut String, name: &str, help: &str, rows: impl Iterator<Item = (String, u64)>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (labels, n) in rows {
        let _ = writeln!(out, "{name}{{{labels}}} {n}");
    }
}

/// A label value with Prometheus' escapes.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn request(&self, model: &str, status: u16) {
        let mut r = locked(&self.requests);
        *r.entry((model.to_string(), status)).or_default() += 1;
    }

    pub fn answered_by(&self, expert: &str) {
        let mut e = locked(&self.experts);
        *e.entry(expert.to_string()).or_default() += 1;
    }

    pub fn tokens(&self, n: usize) {
        self.tokens.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn first_token(&self, d: Duration) {
        self.time_to_first_token.observe(d);
    }

    pub fn between_tokens(&self, d: Duration) {
        self.inter_token.observe(d);
    }

    pub fn first_pass(&self, d: Duration) {
        self.first_pass.observe(d);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let requests = locked(&self.requests);
        counter(
            &mut out,
            "tsq_requests_total",
            "Requests answered, by model and HTTP status.",
            requests.iter().map(|((model, status), &n)| {
                (format!("model=\"{}\",status=\"{status}\"", label(model)), n)
            }),
        );
        let experts = locked(&self.experts);
        counter(
            &mut out,
            "tsq_expert_requests_total",
            "Requests by the expert that answered them.",
            experts
                .iter()
                .map(|(expert, &n)| (format!("expert=\"{}\"", label(expert)), n)),
        );
        let gauges = [
            (
                "tsq_queue_depth",
                "Requests waiting for a place in the decode batch.",
                self.queued.load(Ordering::Relaxed),
            ),
            (
                "tsq_batch_size",
                "Sequences in the decode batch.",
                self.batch.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        let totals = [
            (
                "tsq_generated_tokens_total",
                "Tokens generated.",
                &self.tokens,
            ),
            (
                "tsq_prompt_tokens_total",
                "Prompt tokens prefilled.",
                &self.prompt_tokens,
            ),
            (
                "tsq_prompt_tokens_cached_total",
                "Prompt tokens whose keys and values came from the prefix cache.",
                &self.cached_prompt_tokens,
            ),
        ];
        for (name, help, value) in totals {
            let value = value.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        self.time_to_first_token.render(
            &mut out,
            "tsq_time_to_first_token_seconds",
            "From a request's arrival to its first token.",
        );
        self.inter_token.render(
            &mut out,
            "tsq_inter_token_latency_seconds",
            "Between a request's consecutive pieces of text.",
        );
        self.first_pass.render(
            &mut out,
            "tsq_first_pass_seconds",
            "An adaptation's first pass over the requests that arrived together.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_cumulative_buckets() {
        let m = Metrics::default();
        m.request("run:a\"b", 200);
        m.request("run:a\"b", 200);
        m.answered_by("letters");
        m.tokens(7);
        m.first_token(Duration::from_millis(3));
        m.first_token(Duration::from_millis(40));
        let text = m.render();
        assert!(
            text.contains("tsq_requests_total{model=\"run:a\\\"b\",status=\"200\"} 2"),
            "{text}"
        );
        assert!(text.contains("tsq_expert_requests_total{expert=\"letters\"} 1"));
        assert!(text.contains("tsq_generated_tokens_total 7"));
        assert!(text.contains("tsq_time_to_first_token_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("tsq_time_to_first_token_seconds_bucket{le=\"0.05\"} 2"));
        assert!(text.contains("tsq_time_to_first_token_seconds_count 2"));
        assert!(text.contains("tsq_batch_size 0"));
    }
}
