//! The layer rule of README's architecture, checked on the source: a top-level module may use
//! only modules below it (comments and test code aside), so there are no cycles and domain
//! modules know neither the pipeline file, the executor, the stages nor the CLI.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::common::repo;

/// Top-level modules from the bottom up: foundations, domain modules (in the order they may
/// use each other), the pipeline file, the executor, the stages, the commands.
const LAYERS: &[&[&str]] = &[
    &["fsutil", "diagnostic", "jinja"],
    &["hash", "yaml", "dag"],
    &["assets"],
    &["data"],
    &["model"],
    &["reward"],
    &["svd"],
    &["svf"],
    &["eval"],
    &["rl"],
    &["adapt"],
    &["report"],
    &["pipeline"],
    &["exec"],
    &["stages"],
    &["serve"],
    &["cmd", "cli"],
];

/// Each top-level module's uses of other top-level modules, with a file that makes each.
fn uses() -> BTreeMap<String, BTreeMap<String, String>> {
    let src = repo().join("src");
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut files = vec![src.clone()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let rel = path.strip_prefix(&src).unwrap();
        let from = module_of(rel);
        if path.extension().is_none_or(|e| e != "rs") || from == "lib" || from == "main" {
            continue;
        }
        if rel.file_name().is_some_and(|n| n == "tests.rs") || from == "fuzz" {
            continue;
        }
        for to in used_modules(&std::fs::read_to_string(&path).unwrap()) {
            if to != from {
                out.entry(from.clone())
                    .or_default()
                    .entry(to)
                    .or_insert_with(|| rel.display().to_string());
            }
        }
    }
    out
}

fn module_of(rel: &Path) -> String {
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The modules named by `crate::<module>` in code: not in comments, nor after the file's first
/// `#[cfg(test)]` (test code comes last in every file here).
fn used_modules(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap();
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap();
        for (at, _) in line.match_indices("crate::") {
            let name: String = line[at + 7..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if !name.is_empty() && name != "VERSION" {
                out.insert(name);
            }
        }
    }
    out
}

fn layer_of(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|layer| layer.contains(&module))
        .unwrap_or_else(|| panic!("module `{module}` is in no layer of tests/architecture.rs"))
}

#[test]
fn no_module_uses_a_module_above_it() {
    let mut violations = Vec::new();
    for (from, tos) in uses() {
        for (to, file) in tos {
            let top = LAYERS.len() - 1;
            let both_top = layer_of(&from) == top && layer_of(&to) == top;
            if layer_of(&to) >= layer_of(&from) && !both_top {
                violations.push(format!("`{from}` uses `{to}` (src/{file})"));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "uses that go up a layer (see README's architecture):\n  {}",
        violations.join("\n  ")
    );
}
