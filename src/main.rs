//! The `tsq` binary: parse the command line, run the command, map errors to exit codes
//! (0 ok, 1 invalid input or failed stage, 2 usage, 130 interrupted).

use std::process::ExitCode;

fn main() -> ExitCode {
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
