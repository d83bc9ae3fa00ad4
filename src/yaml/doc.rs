//! Parsing YAML into a JSON value with positions for every key and value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};
use serde_json::{Map, Number, Value};

use crate::diagnostic::{Diagnostic, Origin, Position};

/// A JSON pointer (`/datasets/arc/split`) naming one node of a document.
pub type Pointer = String;

/// Positions of one node: the value itself and, for mapping entries, the key.
#[derive(Clone, Copy, Debug, Default)]
struct Marks {
    value: Position,
    key: Option<Position>,
}

/// A parsed YAML file: its value as JSON and where each node came from.
#[derive(Clone, Debug)]
pub struct LocatedDoc {
    pub file: PathBuf,
    pub value: Value,
    marks: BTreeMap<Pointer, Marks>,
    /// Nodes replaced by `--set` overrides: pointer → the override argument as written.
    overridden: BTreeMap<Pointer, String>,
}

/// Deepest nesting of sequences and mappings a file may have. Building, converting and
/// dropping a tree recurse once per level, so a few kilobytes of `- - - ...` would overflow
/// the stack; no pipeline comes near this.
const MAX_DEPTH: usize = 64;

/// Refuses nesting past [`MAX_DEPTH`] from the parser's event stream, before any tree exists.
/// A syntax error is left to the loader, which reports it.
fn check_depth(file: &Path, text: &str) -> Result<(), Vec<Diagnostic>> {
    use saphyr_parser::{Event, Parser};
    let mut depth = 0usize;
    for next in Parser::new_from_str(text) {
        let Ok((event, span)) = next else {
            return Ok(());
        };
        match event {
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    let pos = Position {
                        line: span.start.line(),
                        column: span.start.col() + 1,
                    };
                    let why = format!("invalid YAML: nested more than {MAX_DEPTH} levels deep");
                    return Err(vec![Diagnostic::at(file, pos, "", why)]);
                }
            }
            Event::SequenceEnd | Event::MappingEnd => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

impl LocatedDoc {
    /// Parses `text` (the contents of `file`); a YAML syntax error becomes one diagnostic.
    pub fn parse(file: &Path, text: &str) -> Result<Self, Vec<Diagnostic>> {
        check_depth(file, text)?;
        let docs = MarkedYaml::load_from_str(text).map_err(|e| {
            let pos = Position {
                line: e.marker().line(),
                column: e.marker().col() + 1,
            };
            vec![Diagnostic::at(
                file,
                pos,
                "",
                format!("invalid YAML: {}", e.info()),
            )]
        })?;
        let mut doc = LocatedDoc {
            file: file.to_path_buf(),
            value: Value::Null,
            marks: BTreeMap::new(),
            overridden: BTreeMap::new(),
        };
        let mut errors = Vec::new();
        match docs.as_slice() {
            [] => {}
            [root] => doc.value = doc.convert(root, String::new(), None, &mut errors),
            [_, second, ..] => errors.push(Diagnostic::at(
                file,
                position(second),
                "",
                "expected one YAML document, found several (`---` separators)",
            )),
        }
        if errors.is_empty() {
            Ok(doc)
        } else {
            Err(errors)
        }
    }

    /// Reads and parses a file; an unreadable file becomes one diagnostic.
    pub fn load(file: &Path) -> Result<Self, Vec<Diagnostic>> {
        let text =
            crate::fsutil::read_bounded(file, crate::fsutil::MAX_YAML_BYTES).map_err(|e| {
                vec![Diagnostic::at(
                    file,
                    Position { line: 1, column: 1 },
                    "",
                    format!("cannot read file: {e}"),
                )]
            })?;
        Self::parse(file, &text)
    }

    fn convert(
        &mut self,
        node: &MarkedYaml,
        ptr: Pointer,
        key: Option<Position>,
        errors: &mut Vec<Diagnostic>,
    ) -> Value {
        self.marks.insert(
            ptr.clone(),
            Marks {
                value: position(node),
                key,
            },
        );
        match &node.data {
            YamlData::Value(scalar) => self.scalar(scalar, node, &ptr, errors),
            YamlData::Representation(text, _, _) => Value::String(text.to_string()),
            YamlData::Sequence(items) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.convert(item, format!("{ptr}/{i}"), None, errors))
                    .collect(),
            ),
            YamlData::Mapping(entries) => {
                let mut map = Map::new();
                for (k, v) in entries {
                    let Some(name) = key_text(k) else {
                        errors.push(self.error_at(
                            position(k),
                            &ptr,
                            "mapping keys must be plain strings",
                        ));
                        continue;
                    };
                    let child = format!("{ptr}/{}", escape(&name));
                    let value = self.convert(v, child, Some(position(k)), errors);
                    map.insert(name, value);
                }
                Value::Object(map)
            }
            YamlData::Tagged(_, inner) => self.convert(inner, ptr, key, errors),
            YamlData::Alias(_) | YamlData::BadValue => {
                errors.push(self.error_at(
                    position(node),
                    &ptr,
                    "YAML aliases and anchors are not supported here",
                ));
                Value::Null
            }
        }
    }

    fn scalar(
        &self,
        scalar: &Scalar,
        node: &MarkedYaml,
        ptr: &str,
        errors: &mut Vec<Diagnostic>,
    ) -> Value {
        match scalar {
            Scalar::Null => Value::Null,
            Scalar::Boolean(b) => Value::Bool(*b),
            Scalar::Integer(i) => Value::from(*i),
            Scalar::FloatingPoint(f) => Number::from_f64(f.into_inner())
                .map(Value::Number)
                .unwrap_or_else(|| {
                    errors.push(self.error_at(position(node), ptr, "expected a finite number"));
                    Value::Null
                }),
            Scalar::String(s) => Value::String(s.to_string()),
        }
    }

    fn error_at(&self, pos: Position, ptr: &str, message: &str) -> Diagnostic {
        Diagnostic::at(&self.file, pos, dotted(ptr), message)
    }

    /// A diagnostic about the node at `ptr` (or its nearest located ancestor); `on_key` points at
    /// the mapping key instead of the value, which reads better for unknown or misplaced keys.
    pub fn diagnostic(&self, ptr: &str, on_key: bool, message: impl Into<String>) -> Diagnostic {
        let path = dotted(ptr);
        if let Some((_, argument)) = self.overridden.iter().find(|(p, _)| is_within(ptr, p)) {
            return Diagnostic {
                origin: Origin::Override {
                    argument: argument.clone(),
                },
                path,
                message: message.into(),
                help: None,
            };
        }
        let mut at = ptr;
        loop {
            if let Some(m) = self.marks.get(at) {
                let pos = if on_key {
                    m.key.unwrap_or(m.value)
                } else {
                    m.value
                };
                return Diagnostic::at(&self.file, pos, path, message);
            }
            match at.rfind('/') {
                Some(i) => at = &at[..i],
                None => {
                    return Diagnostic::at(
                        &self.file,
                        Position { line: 1, column: 1 },
                        path,
                        message,
                    );
                }
            }
        }
    }

    /// Replaces (or adds) the node at the dotted `path` with `value`, remembering that errors about
    /// it come from the command line. Intermediate mappings must already exist.
    pub fn set(&mut self, path: &str, value: Value, argument: &str) -> Result<(), SetError> {
        let segments: Vec<&str> = path.split('.').collect();
        if segments.iter().any(|s| s.is_empty()) {
            return Err(SetError::BadPath(path.to_string()));
        }
        let mut node = &mut self.value;
        let mut ptr = String::new();
        for (i, seg) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            node = match node {
                Value::Object(map) => {
                    ptr = format!("{ptr}/{}", escape(seg));
                    if last {
                        map.insert(seg.to_string(), Value::Null);
                    } else if !map.contains_key(*seg) {
                        let known: Vec<&str> = map.keys().map(String::as_str).collect();
                        return Err(SetError::NoKey {
                            parent: dotted(&ptr[..ptr.rfind('/').unwrap_or(0)]),
                            key: seg.to_string(),
                            did_you_mean: crate::diagnostic::did_you_mean(seg, known)
                                .map(str::to_string),
                        });
                    }
                    map.get_mut(*seg)
                        .expect("present: checked or inserted above")
                }
                Value::Array(items) => {
                    let index: usize = seg
                        .parse()
                        .map_err(|_| SetError::NotAnIndex(seg.to_string()))?;
                    ptr = format!("{ptr}/{index}");
                    items
                        .get_mut(index)
                        .ok_or(SetError::IndexOutOfRange(index))?
                }
                _ => {
                    return Err(SetError::NotAMapping {
                        path: dotted(&ptr),
                        key: seg.to_string(),
                    });
                }
            };
        }
        *node = value;
        self.overridden.insert(ptr, argument.to_string());
        Ok(())
    }
}

/// Why an override's path does not lead into the document.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error("`{0}` is not a valid field path (expected `a.b.c`)")]
    BadPath(String),
    #[error(
        "{} has no key `{key}`{}",
        if parent.is_empty() { "the file".to_string() } else { format!("`{parent}`") },
        did_you_mean.as_ref().map(|k| format!(" (did you mean `{k}`?)")).unwrap_or_default()
    )]
    NoKey {
        /// The dotted path of the mapping (empty: the document itself).
        parent: String,
        key: String,
        did_you_mean: Option<String>,
    },
    #[error("`{0}` is not a list index")]
    NotAnIndex(String),
    #[error("list index {0} is out of range")]
    IndexOutOfRange(usize),
    #[error("`{path}` is not a mapping, cannot set `{key}` inside it")]
    NotAMapping { path: String, key: String },
}

fn position(node: &MarkedYaml) -> Position {
    Position {
        line: node.span.start.line(),
        column: node.span.start.col() + 1,
    }
}

fn key_text(key: &MarkedYaml) -> Option<String> {
    match &key.data {
        YamlData::Value(Scalar::String(s)) => Some(s.to_string()),
        YamlData::Value(Scalar::Integer(i)) => Some(i.to_string()),
        YamlData::Value(Scalar::Boolean(b)) => Some(b.to_string()),
        YamlData::Representation(s, _, _) => Some(s.to_string()),
        _ => None,
    }
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn is_within(ptr: &str, ancestor: &str) -> bool {
    ptr == ancestor || ptr.starts_with(&format!("{ancestor}/"))
}

/// `/evaluate/0/dataset` → `evaluate[0].dataset`: the form users see in messages.
pub fn dotted(ptr: &str) -> String {
    let mut out = String::new();
    for seg in ptr.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if seg.parse::<usize>().is_ok() {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 20,000 nested block sequences (40 KB) once overflowed the stack; now a located error.
    #[test]
    fn deep_nesting_is_refused_before_a_tree_is_built() {
        let deep = format!("{}x\n", "- ".repeat(20_000));
        let errors = LocatedDoc::parse(Path::new("deep.yaml"), &deep).unwrap_err();
        assert_eq!(errors.len(), 1);
        let message = errors[0].to_string();
        assert!(message.contains("nested more than 64 levels"), "{message}");
        let shallow = format!("{}x\n", "- ".repeat(40));
        assert!(LocatedDoc::parse(Path::new("ok.yaml"), &shallow).is_ok());
    }

    #[test]
    fn keeps_positions_of_keys_and_values() {
        let doc = LocatedDoc::parse(Path::new("f.yaml"), "a: 1\nb:\n  c: [x, y]\n").unwrap();
        assert_eq!(doc.value["b"]["c"][1], "y");
        let d = doc.diagnostic("/b/c/1", false, "m");
        assert_eq!(d.line(), Some(3));
        assert_eq!(d.path, "b.c[1]");
        assert_eq!(
            doc.diagnostic("/b", true, "m").origin,
            Origin::File {
                file: "f.yaml".into(),
                line: 2,
                column: 1
            }
        );
    }

    #[test]
    fn syntax_error_has_a_line() {
        let err = LocatedDoc::parse(Path::new("f.yaml"), "a: 1\nb: [1, 2\n").unwrap_err();
        assert_eq!(err.len(), 1);
        assert!(err[0].line().unwrap() >= 2, "{:?}", err[0]);
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        assert!(LocatedDoc::parse(Path::new("f.yaml"), "a: 1\na: 2\n").is_err());
    }

    #[test]
    fn overrides_replace_and_are_attributed() {
        let mut doc = LocatedDoc::parse(Path::new("f.yaml"), "a:\n  b: 1\n").unwrap();
        doc.set("a.b", Value::from(5), "a.b=5").unwrap();
        assert_eq!(doc.value["a"]["b"], 5);
        assert_eq!(
            doc.diagnostic("/a/b", false, "m").origin,
            Origin::Override {
                argument: "a.b=5".into()
            }
        );
        assert!(
            doc.set("x.y", Value::Null, "x.y=1")
                .unwrap_err()
                .to_string()
                .contains("no key `x`")
        );
    }
}
