//! The one minijinja setup for every template tsq renders: prompt and target templates, chat
//! templates from model files, classifier/router templates and report templates. Most come
//! from files tsq did not write (a downloaded model's chat template above all), so each render
//! is bounded: fuel caps the instructions executed (nested loops end with an error instead of
//! hanging), a capped writer caps the output, and minijinja's own limits cap recursion (500
//! frames) and any one repeated string or list (100 M). Not bounded: memory built up without
//! output, e.g. a string doubled by `~` in a loop (docs/security.md).

use minijinja::{Environment, Error, ErrorKind, Template, Value};

/// Instructions one render may execute: ~1-2 s of work; the built-in report over a large run
/// uses well under 1 %.
pub const FUEL: u64 = 100_000_000;
/// Bytes one render may write.
pub const MAX_OUTPUT_BYTES: usize = 64 << 20;

/// An environment with the render limits set and Python's string, list and dict methods
/// (templates written for Python's Jinja call them); callers add their filters and templates.
pub fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_fuel(Some(FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env
}

/// Renders `template` with `ctx`, failing once the output passes [`MAX_OUTPUT_BYTES`].
pub fn render(template: &Template, ctx: impl Into<Value>) -> Result<String, Error> {
    let mut out = CappedOutput::default();
    let rendered = template.render_captured_to(ctx, &mut out);
    if out.overflowed {
        // minijinja reports a failed write without its reason.
        return Err(Error::new(
            ErrorKind::WriteFailure,
            format!("the output grew past the {MAX_OUTPUT_BYTES} bytes allowed"),
        ));
    }
    rendered?;
    String::from_utf8(out.bytes)
        .map_err(|_| Error::new(ErrorKind::WriteFailure, "the output is not UTF-8"))
}

#[derive(Default)]
struct CappedOutput {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_OUTPUT_BYTES {
            self.overflowed = true;
            return Err(std::io::ErrorKind::FileTooLarge.into());
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_source(source: &str) -> Result<String, Error> {
        let mut env = environment();
        env.add_template("t", source)?;
        render(&env.get_template("t")?, ())
    }

    #[test]
    fn hostile_templates_end_with_an_error() {
        assert_eq!(render_source("{{ 1 + 2 }}").unwrap(), "3");
        let cases = [
            // 10^15 iterations: would hang without fuel.
            (
                "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}x{% endfor %}{% endfor %}{% endfor %}",
                "fuel",
            ),
            // 100 × 10 MB = 1 GB of output in a handful of instructions.
            (
                "{% for i in range(100) %}{{ 'x' * 10000000 }}{% endfor %}",
                "grew past",
            ),
            (
                "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
                "recursion",
            ),
        ];
        for (source, want) in cases {
            let err = render_source(source).unwrap_err();
            assert!(format!("{err:#}").contains(want), "{source}: {err:#}");
        }
    }
}
