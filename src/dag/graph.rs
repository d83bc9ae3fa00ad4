//! Building the graph from a [`PipelineSpec`] and ordering it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A stage's name, also its directory under the run directory: `model`, `data.arc`, `train.math`...
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StageId(pub String);

impl StageId {
    /// `kind`, or `kind.subject` for a kind with one stage per subject (a dataset, an
    /// expert...). Stage kinds make their ids through this (`crate::stages`), never by hand.
    pub fn new(kind: &str, subject: Option<&str>) -> Self {
        match subject {
            Some(subject) => Self(format!("{kind}.{subject}")),
            None => Self(kind.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The kind's part of the id (`train` in `train.math`).
    pub fn kind(&self) -> &str {
        self.0.split_once('.').map_or(&self.0, |(kind, _)| kind)
    }

    /// The subject's part, for kinds with one stage per subject (`math` in `train.math`).
    pub fn subject(&self) -> Option<&str> {
        self.0.split_once('.').map(|(_, subject)| subject)
    }
}

impl fmt::Display for StageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One node: its kind, its dependencies, and the config subtree that goes into its cache key.
/// Stage kinds (what declares stages and runs them) live in `crate::stages`; the graph only
/// orders what they declare.
#[derive(Clone, Debug, Serialize)]
pub struct Stage {
    pub id: StageId,
    /// The kind's name (`model`, `data`, `eval`, ...).
    pub kind: &'static str,
    /// The kind's behaviour version, part of the cache key: bumped when the stage would compute
    /// something different from the same inputs, and only then.
    pub version: u32,
    /// What the stage works on within its kind (a dataset, an expert, an evaluation), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub deps: Vec<StageId>,
    /// The part of the pipeline this stage reads; a change to it re-runs the stage.
    pub config: Value,
    /// JSON pointer of the section that defines the stage (for locating errors).
    pub pointer: String,
}

/// A dependency cycle, listed in order, first stage repeated at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CycleError {
    pub cycle: Vec<StageId>,
}

impl fmt::Display for CycleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.cycle.iter().map(|s| format!("`{s}`")).collect();
        write!(f, "dependency cycle: {}", names.join(" → "))
    }
}

/// Stages in a valid run order (dependencies first).
#[derive(Clone, Debug, Serialize)]
pub struct Graph {
    pub stages: Vec<Stage>,
}

impl Graph {
    /// Orders declared stages (dependencies first); a dependency cycle is reported in full.
    pub fn new(stages: Vec<Stage>) -> Result<Self, CycleError> {
        order(stages)
    }

    pub fn get(&self, id: &StageId) -> Option<&Stage> {
        self.stages.iter().find(|s| &s.id == id)
    }

    /// `ids` plus everything that depends on them, transitively.
    pub fn downstream_of(&self, ids: &BTreeSet<StageId>) -> BTreeSet<StageId> {
        let mut out = ids.clone();
        for stage in &self.stages {
            if stage.deps.iter().any(|d| out.contains(d)) {
                out.insert(stage.id.clone());
            }
        }
        out
    }
}

/// Orders stages by [`dependency_order`].
fn order(stages: Vec<Stage>) -> Result<Graph, CycleError> {
    let nodes: Vec<(&StageId, &[StageId])> =
        stages.iter().map(|s| (&s.id, s.deps.as_slice())).collect();
    let sorted = dependency_order(&nodes)?;
    let mut slots: Vec<Option<Stage>> = stages.into_iter().map(Some).collect();
    Ok(Graph {
        stages: sorted.into_iter().filter_map(|i| slots[i].take()).collect(),
    })
}

/// The indices of `nodes` (id, dependencies) in an order where dependencies come first, stable
/// with respect to the given order; a cycle is reported in full. A dependency that is not a
/// node is ignored (references are checked before anything is ordered).
pub fn dependency_order(nodes: &[(&StageId, &[StageId])]) -> Result<Vec<usize>, CycleError> {
    let index: BTreeMap<&StageId, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (*id, i))
        .collect();
    // 0 = unvisited, 1 = on the current path, 2 = done.
    let mut state = vec![0u8; nodes.len()];
    let mut sorted = Vec::with_capacity(nodes.len());
    let mut path = Vec::new();
    fn visit(
        i: usize,
        nodes: &[(&StageId, &[StageId])],
        index: &BTreeMap<&StageId, usize>,
        state: &mut [u8],
        path: &mut Vec<usize>,
        sorted: &mut Vec<usize>,
    ) -> Result<(), CycleError> {
        match state[i] {
            2 => return Ok(()),
            1 => {
                let start = path.iter().position(|&p| p == i).unwrap_or(0);
                let mut cycle: Vec<StageId> =
                    path[start..].iter().map(|&p| nodes[p].0.clone()).collect();
                cycle.push(nodes[i].0.clone());
                return Err(CycleError { cycle });
            }
            _ => {}
        }
        state[i] = 1;
        path.push(i);
        for dep in nodes[i].1 {
            if let Some(&d) = index.get(dep) {
                visit(d, nodes, index, state, path, sorted)?;
            }
        }
        path.pop();
        state[i] = 2;
        sorted.push(i);
        Ok(())
    }
    for i in 0..nodes.len() {
        visit(i, nodes, &index, &mut state, &mut path, &mut sorted)?;
    }
    Ok(sorted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, deps: &[&str]) -> Stage {
        Stage {
            id: StageId(id.into()),
            kind: "test",
            version: 1,
            subject: None,
            deps: deps.iter().map(|d| StageId(d.to_string())).collect(),
            config: Value::Null,
            pointer: String::new(),
        }
    }

    #[test]
    fn orders_dependencies_first() {
        let g = Graph::new(vec![
            node("a", &["b", "d"]),
            node("b", &["d"]),
            node("d", &[]),
            node("e", &["a"]),
        ])
        .unwrap();
        let pos = |id: &str| g.stages.iter().position(|s| s.id.0 == id).unwrap();
        assert!(pos("b") < pos("a"));
        assert!(pos("d") < pos("b"));
        assert!(pos("a") < pos("e"));
        let down = g.downstream_of(&BTreeSet::from([StageId("b".into())]));
        assert_eq!(
            down.into_iter().map(|s| s.0).collect::<Vec<_>>(),
            ["a", "b", "e"]
        );
    }

    #[test]
    fn reports_the_whole_cycle() {
        let err = Graph::new(vec![node("a", &["b"]), node("b", &["a"])]).unwrap_err();
        assert_eq!(err.to_string(), "dependency cycle: `a` → `b` → `a`");
    }
}
