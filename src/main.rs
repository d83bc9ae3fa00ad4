//! The `tsq` binary: parse the command line, run the command, map errors to exit codes
//! (0 ok, 1 invalid input or failed stage, 2 usage, 130 interrupted).

use std::process::ExitCode;

fn main() -> ExitCode {
    // `tsq ... | head` should end quietly when the reader goes away, as other Unix tools do,
    // not panic on the broken pipe (Rust ignores SIGPIPE by default).
    // SAFETY: restoring a signal's default disposition at startup, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    keep_freed_memory();
    shorten_candle_spinning();
    if let Err(message) = check_simd_cap() {
        eprintln!("error: {message}");
        return ExitCode::from(2);
    }
    match tsq::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !matches!(e, tsq::cmd::CmdError::Reported(_)) {
                eprintln!("error: {e}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// Large tensors come and go many times per forward pass (a prompt batch's activations, each
/// attention part's scores). glibc gives blocks over 128 KiB back to the system when they are
/// freed and faults fresh zeroed pages in for the next one: a prefill of six 600-token prompts
/// took 1.35 million page faults, a third of its time in the kernel (docs/benchmarks.md,
/// 2026-12-07). Blocks up to 32 MiB (glibc's maximum) now come from the heap, which keeps up
/// to 1 GiB of freed memory for reuse: 0.42 million faults, 2.2 s less system time.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation thresholds; called at startup, before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// candle's own worker threads (its elementwise ops) spin 25 000 times after each job before
/// they sleep. On 2 cores a spinning candle thread holds the core that rayon's second worker
/// needs for the products that follow: a 512-token prefill ran 15-20% faster with 2000, batch-1
/// decoding the same (docs/benchmarks.md, 2026-12-07). A value set by the user wins.
fn shorten_candle_spinning() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        // SAFETY: called at startup, before any other thread exists to read the environment.
        unsafe { std::env::set_var(VAR, "2000") };
    }
}

/// Refuses a [`tsq_linalg::SIMD_VAR`] that names no level (the kernels would ignore it), and
/// says so when it asks for more than the CPU runs.
fn check_simd_cap() -> Result<(), String> {
    use tsq_linalg::{SIMD_VAR, Simd};
    let Some(value) = std::env::var_os(SIMD_VAR) else {
        return Ok(());
    };
    let names = Simd::ALL.map(Simd::name).join(", ");
    let value = value.to_string_lossy();
    let wanted = Simd::named(&value)
        .ok_or_else(|| format!("{SIMD_VAR}={value:?} names no level: expected one of {names}"))?;
    let detected = Simd::detected();
    if wanted > detected {
        eprintln!(
            "note: {SIMD_VAR}={value}, but this CPU runs up to {}: using that",
            detected.name()
        );
    }
    Ok(())
}
