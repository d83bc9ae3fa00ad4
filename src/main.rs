//! The `tsq` binary: parse the command line, run the command, map errors to exit codes
//! (0 ok, 1 invalid input or failed stage, 2 usage, 130 interrupted).

use std::process::ExitCode;

fn main() -> ExitCode {
    // `tsq ... | head` should end quietly when the reader goes away, as other Unix tools do,
    // not panic on the broken pipe (Rust ignores SIGPIPE by default).
    // SAFETY: restoring a signal's default disposition at startup, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
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
