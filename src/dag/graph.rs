//! Building the graph from a [`PipelineSpec`] and ordering it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;
use serde_json::{Value, json};

use crate::pipeline::spec::PipelineSpec;

/// A stage's name, also its directory under the run directory: `model`, `data.arc`, `train.math`...
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct StageId(pub String);

impl fmt::Display for StageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StageKind {
    Model,
    Data { dataset: String },
    Decompose,
    Train { expert: String },
    Adapt,
    Eval { dataset: String },
    Report,
}

impl StageKind {
    /// Whether this version of tsq can run the stage. The others are accepted in pipeline files
    /// (so files can be written ahead) but `run` refuses them up front.
    pub fn is_available(&self) -> bool {
        matches!(self, Self::Model | Self::Data { .. } | Self::Decompose)
    }
}

/// One node: its kind, its dependencies, and the config subtree that goes into its cache key.
#[derive(Clone, Debug, Serialize)]
pub struct Stage {
    pub id: StageId,
    pub kind: StageKind,
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
    /// Derives the stages of a spec whose references have been checked, and orders them.
    pub fn from_spec(spec: &PipelineSpec) -> Result<Self, CycleError> {
        order(derive_stages(spec))
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

fn stage(id: String, kind: StageKind, deps: Vec<String>, config: Value, pointer: &str) -> Stage {
    Stage {
        id: StageId(id),
        kind,
        deps: deps.into_iter().map(StageId).collect(),
        config,
        pointer: pointer.into(),
    }
}

fn derive_stages(spec: &PipelineSpec) -> Vec<Stage> {
    let mut stages = vec![stage(
        "model".into(),
        StageKind::Model,
        vec![],
        to(&spec.model),
        "/model",
    )];
    for (name, ds) in &spec.datasets {
        let seed = ds.split.seed.unwrap_or(spec.seed);
        let config = json!({"dataset": to(ds), "split_seed": seed});
        stages.push(stage(
            format!("data.{name}"),
            StageKind::Data {
                dataset: name.clone(),
            },
            vec![],
            config,
            &format!("/datasets/{name}"),
        ));
    }
    if let Some(svd) = &spec.svd {
        stages.push(stage(
            "decompose".into(),
            StageKind::Decompose,
            vec!["model".into()],
            to(svd),
            "/svd",
        ));
    }
    for (name, ex) in &spec.experts {
        let mut deps = vec!["model".to_string(), format!("data.{}", ex.dataset)];
        if spec.svd.is_some() {
            deps.push("decompose".into());
        }
        if let Some(from) = &ex.init_from {
            deps.push(format!("train.{from}"));
        }
        let config = json!({"expert": to(ex), "reward": spec.rewards.get(&ex.reward).map(to), "seed": spec.seed});
        stages.push(stage(
            format!("train.{name}"),
            StageKind::Train {
                expert: name.clone(),
            },
            deps,
            config,
            &format!("/experts/{name}"),
        ));
    }
    if let Some(ad) = &spec.adaptation {
        let deps = ad.experts.iter().map(|e| format!("train.{e}")).collect();
        stages.push(stage(
            "adapt".into(),
            StageKind::Adapt,
            deps,
            to(ad),
            "/adaptation",
        ));
    }
    for (i, ev) in spec.evaluate.iter().enumerate() {
        let mut deps = vec!["model".to_string(), format!("data.{}", ev.dataset)];
        for w in &ev.with {
            match w.as_str() {
                "base" => {}
                "adaptive" => deps.push("adapt".into()),
                expert => deps.push(format!("train.{expert}")),
            }
        }
        let config = json!({"evaluate": to(ev), "reward": ev.reward.as_ref().and_then(|r| spec.rewards.get(r)).map(to)});
        stages.push(stage(
            format!("eval.{}", ev.dataset),
            StageKind::Eval {
                dataset: ev.dataset.clone(),
            },
            deps,
            config,
            &format!("/evaluate/{i}"),
        ));
    }
    if let Some(report) = &spec.report {
        let deps = spec
            .evaluate
            .iter()
            .map(|e| format!("eval.{}", e.dataset))
            .collect();
        stages.push(stage(
            "report".into(),
            StageKind::Report,
            deps,
            to(report),
            "/report",
        ));
    }
    stages
}

fn to<T: serde::Serialize>(section: &T) -> Value {
    serde_json::to_value(section).expect("spec types serialise to JSON")
}

/// Topological order, stable with respect to declaration order; reports a cycle in full.
fn order(stages: Vec<Stage>) -> Result<Graph, CycleError> {
    let index: BTreeMap<&StageId, usize> =
        stages.iter().enumerate().map(|(i, s)| (&s.id, i)).collect();
    // 0 = unvisited, 1 = on the current path, 2 = done.
    let mut state = vec![0u8; stages.len()];
    let mut sorted = Vec::with_capacity(stages.len());
    let mut path = Vec::new();
    fn visit(
        i: usize,
        stages: &[Stage],
        index: &BTreeMap<&StageId, usize>,
        state: &mut [u8],
        path: &mut Vec<usize>,
        sorted: &mut Vec<usize>,
    ) -> Result<(), CycleError> {
        match state[i] {
            2 => return Ok(()),
            1 => {
                let start = path.iter().position(|&p| p == i).unwrap_or(0);
                let mut cycle: Vec<StageId> = path[start..]
                    .iter()
                    .map(|&p| stages[p].id.clone())
                    .collect();
                cycle.push(stages[i].id.clone());
                return Err(CycleError { cycle });
            }
            _ => {}
        }
        state[i] = 1;
        path.push(i);
        for dep in &stages[i].deps {
            // References were checked before the graph is built; an unknown one has no stage to order.
            if let Some(&d) = index.get(dep) {
                visit(d, stages, index, state, path, sorted)?;
            }
        }
        path.pop();
        state[i] = 2;
        sorted.push(i);
        Ok(())
    }
    for i in 0..stages.len() {
        visit(i, &stages, &index, &mut state, &mut path, &mut sorted)?;
    }
    let mut slots: Vec<Option<Stage>> = stages.into_iter().map(Some).collect();
    Ok(Graph {
        stages: sorted.into_iter().filter_map(|i| slots[i].take()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml_experts: &str) -> PipelineSpec {
        let text = format!(
            "version: 1\nname: t\nmodel: {{source: m.gguf}}\ndatasets:\n  d: {{card: c.yaml, prompt: p.jinja}}\nrewards:\n  r: {{kind: exact_number}}\nexperts:\n{yaml_experts}evaluate:\n  - {{dataset: d, with: [base, a]}}\n"
        );
        let doc = crate::yaml::LocatedDoc::parse(std::path::Path::new("t.yaml"), &text).unwrap();
        serde_json::from_value(doc.value).unwrap()
    }

    #[test]
    fn orders_dependencies_first() {
        let g = Graph::from_spec(&spec(
            "  a: {dataset: d, reward: r, init_from: b}\n  b: {dataset: d, reward: r}\n",
        ))
        .unwrap();
        let pos = |id: &str| g.stages.iter().position(|s| s.id.0 == id).unwrap();
        assert!(pos("train.b") < pos("train.a"));
        assert!(pos("data.d") < pos("train.b"));
        assert!(pos("train.a") < pos("eval.d"));
        let down = g.downstream_of(&BTreeSet::from([StageId("train.b".into())]));
        assert_eq!(
            down.into_iter().map(|s| s.0).collect::<Vec<_>>(),
            ["eval.d", "train.a", "train.b"]
        );
    }

    #[test]
    fn reports_the_whole_cycle() {
        let err = Graph::from_spec(&spec("  a: {dataset: d, reward: r, init_from: b}\n  b: {dataset: d, reward: r, init_from: a}\n")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "dependency cycle: `train.a` → `train.b` → `train.a`"
        );
    }
}
