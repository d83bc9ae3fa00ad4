//! Prompt and target templates (minijinja). One environment configuration for checking and
//! rendering, so a template that validates renders the same way in the data stage.

use std::path::Path;

use minijinja::{Environment, UndefinedBehavior};

use super::TemplateError;
use crate::diagnostic::{Diagnostic, Position};

/// A template file's text and its compiled form.
pub struct TemplateFile {
    env: Environment<'static>,
}

fn environment() -> Environment<'static> {
    let mut env = crate::jinja::environment();
    // A record missing a field the template uses is a bad record, not an empty string.
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env
}

impl TemplateFile {
    /// Reads and compiles a template; syntax errors point at the template's own line.
    pub fn load(path: &Path) -> Result<Self, Diagnostic> {
        let at =
            |line: usize, msg: String| Diagnostic::at(path, Position { line, column: 1 }, "", msg);
        let source = crate::fsutil::read_bounded(path, crate::fsutil::MAX_TEXT_BYTES)
            .map_err(|e| at(1, format!("cannot read template: {e}")))?;
        let mut env = environment();
        env.add_template_owned("t", source).map_err(|e| {
            at(
                e.line().unwrap_or(1),
                format!(
                    "template does not parse: {}",
                    e.detail().unwrap_or("syntax error")
                ),
            )
        })?;
        Ok(Self { env })
    }

    /// Compiles a template kept as text (as a stage saved it).
    pub fn from_source(source: &str) -> Result<Self, TemplateError> {
        let mut env = environment();
        env.add_template_owned("t", source.to_string())
            .map_err(|e| TemplateError {
                detail: format!("template does not parse: {e}"),
                line: None,
            })?;
        Ok(Self { env })
    }

    /// Renders with `record`'s fields as top-level variables.
    pub fn render(&self, record: &serde_json::Value) -> Result<String, TemplateError> {
        let template = self.env.get_template("t")?;
        Ok(crate::jinja::render(
            &template,
            minijinja::value::Serde(record),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_rendering_and_located_syntax_errors() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("g.jinja");
        std::fs::write(&good, "Q: {{ question }}\n{% for c in choices %}{{ 'ABCD'[loop.index0] }}. {{ c }}\n{% endfor %}").unwrap();
        let t = TemplateFile::load(&good).unwrap();
        let out = t
            .render(&serde_json::json!({"question": "Why?", "choices": ["x", "y"]}))
            .unwrap();
        assert_eq!(out, "Q: Why?\nA. x\nB. y\n");
        assert!(t.render(&serde_json::json!({"question": "Why?"})).is_err());
        let bad = dir.path().join("b.jinja");
        std::fs::write(&bad, "line one\n{{ question }\n").unwrap();
        assert_eq!(TemplateFile::load(&bad).err().unwrap().line(), Some(2));
    }
}
