//! Located diagnostics: one problem in one input file, with where it is, which field, and what was
//! expected. Every validation error a user sees goes through this type, in text or JSON.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// A 1-based line and column in a source file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// Where a diagnostic points: a file position, or a command-line override.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    File {
        file: PathBuf,
        line: usize,
        column: usize,
    },
    Override {
        argument: String,
    },
}

/// One problem found while reading or checking an input file.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Diagnostic {
    pub origin: Origin,
    /// Dotted field path, e.g. `datasets.arc.split.train` (empty for the document root).
    pub path: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn at(
        file: &Path,
        pos: Position,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            origin: Origin::File {
                file: file.to_path_buf(),
                line: pos.line,
                column: pos.column,
            },
            path: path.into(),
            message: message.into(),
            help: None,
        }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// The line this diagnostic points at, if it points into a file (used for sorting and tests).
    pub fn line(&self) -> Option<usize> {
        match &self.origin {
            Origin::File { line, .. } => Some(*line),
            Origin::Override { .. } => None,
        }
    }
}

impl std::error::Error for Diagnostic {}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::File { file, line, column } => {
                write!(f, "{}:{line}:{column}: ", file.display())?
            }
            Origin::Override { argument } => write!(f, "--set {argument}: ")?,
        }
        if !self.path.is_empty() {
            write!(f, "`{}`: ", self.path)?;
        }
        write!(f, "{}", self.message)?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// Renders diagnostics as text with the offending source line and a caret under the column.
pub fn render_text(
    diagnostics: &[Diagnostic],
    read_source: impl Fn(&Path) -> Option<String>,
) -> String {
    // Each file is read and split once, however many problems it has: linear in the input.
    let mut sources: std::collections::BTreeMap<&Path, Option<Vec<String>>> = Default::default();
    let mut out = String::new();
    for d in diagnostics.iter().take(MAX_SHOWN) {
        out.push_str(&format!("error: {d}\n"));
        if let Origin::File { file, line, column } = &d.origin
            && let Some(lines) = sources
                .entry(file.as_path())
                .or_insert_with(|| read_source(file).map(|t| t.lines().map(String::from).collect()))
            && let Some(src_line) = lines.get(line.saturating_sub(1))
        {
            let gutter = line.to_string();
            out.push_str(&format!("  {gutter} | {src_line}\n"));
            let pad = " ".repeat(gutter.len());
            let caret_pad = " ".repeat(column.saturating_sub(1));
            out.push_str(&format!("  {pad} | {caret_pad}^\n"));
        }
    }
    if diagnostics.len() > MAX_SHOWN {
        out.push_str(&format!(
            "... and {} more problem(s) (`--format json` lists them all)\n",
            diagnostics.len() - MAX_SHOWN
        ));
    }
    out
}

/// Problems shown in a text report; the JSON report has them all.
pub const MAX_SHOWN: usize = 50;

/// The closest candidate to `word` by edit distance, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_keys_only() {
        let keys = ["datasets", "rewards", "experts"];
        assert_eq!(did_you_mean("dataset", keys), Some("datasets"));
        assert_eq!(did_you_mean("exprets", keys), Some("experts"));
        assert_eq!(did_you_mean("zzz", keys), None);
    }

    #[test]
    fn text_rendering_points_at_column() {
        let d = Diagnostic::at(
            Path::new("p.yaml"),
            Position { line: 2, column: 3 },
            "a.b",
            "bad",
        );
        let text = render_text(&[d], |_| Some("x: 1\na: {b: 2}\n".into()));
        assert!(text.contains("p.yaml:2:3: `a.b`: bad"), "{text}");
        assert!(text.contains("  2 | a: {b: 2}\n    |   ^"), "{text}");
    }
}
