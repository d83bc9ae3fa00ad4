//! Which weight matrices a pipeline's `svd` section selects: regexes over the module part of
//! canonical names (`mlp.up_proj` in `layers.3.mlp.up_proj`) and a layer selection.

use regex::Regex;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which weight matrices to decompose; each matched matrix gets one SVF vector per expert.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SvdSpec {
    /// Regexes over canonical module names such as `layers.3.mlp.up_proj` (matched against the part
    /// after `layers.{i}.`).
    #[schemars(length(min = 1))]
    pub targets: Vec<String>,
    /// `all`, an inclusive range `a-b`, or a list of layer indices.
    #[serde(default)]
    pub layers: Layers,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(untagged)]
pub enum Layers {
    /// `all` or an inclusive range like `0-11`.
    Named(#[schemars(regex(pattern = r"^(all|[0-9]+-[0-9]+)$"))] String),
    /// A list of layer indices.
    List(#[schemars(length(min = 1))] Vec<u32>),
}

impl Default for Layers {
    fn default() -> Self {
        Layers::Named("all".into())
    }
}

/// The decomposable modules of each layer, in canonical order.
pub const LAYER_MODULES: [&str; 7] = [
    "attn.q_proj",
    "attn.k_proj",
    "attn.v_proj",
    "attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Why a selection of matrices does not fit the model.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("`{pattern}` is not a valid regex: {source}")]
    BadRegex {
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error("the targets {targets:?} match none of the modules {}", LAYER_MODULES.join(", "))]
    NoModule { targets: Vec<String> },
    #[error("`{0}` is not `all` or a range `a-b`")]
    NotARange(String),
    #[error("bad range `{0}`")]
    BadRange(String),
    #[error("layer {layer} does not exist: the model has layers 0-{}", num_layers.saturating_sub(1))]
    NoSuchLayer { layer: usize, num_layers: usize },
}

/// Canonical names (`layers.{i}.{module}`) selected by `spec` in a model of `num_layers` layers.
pub fn select(spec: &SvdSpec, num_layers: usize) -> Result<Vec<String>, TargetError> {
    let patterns: Vec<Regex> = spec
        .targets
        .iter()
        .map(|t| {
            Regex::new(t).map_err(|source| TargetError::BadRegex {
                pattern: t.clone(),
                source,
            })
        })
        .collect::<Result<_, _>>()?;
    let layers = layer_indices(&spec.layers, num_layers)?;
    let modules: Vec<&str> = LAYER_MODULES
        .iter()
        .copied()
        .filter(|m| patterns.iter().any(|p| p.is_match(m)))
        .collect();
    if modules.is_empty() {
        return Err(TargetError::NoModule {
            targets: spec.targets.clone(),
        });
    }
    Ok(layers
        .iter()
        .flat_map(|l| modules.iter().map(move |m| format!("layers.{l}.{m}")))
        .collect())
}

/// (rows, cols) of a selected matrix, from the model config alone.
pub fn shape(config: &crate::model::config::ModelConfig, name: &str) -> (usize, usize) {
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let (q, kv) = (
        config.num_heads * config.head_dim,
        config.num_kv_heads * config.head_dim,
    );
    match name.rsplit('.').next().unwrap_or("") {
        "q_proj" => (q, h),
        "k_proj" | "v_proj" => (kv, h),
        "o_proj" => (h, q),
        "gate_proj" | "up_proj" => (i, h),
        _ => (h, i), // down_proj
    }
}

fn layer_indices(layers: &Layers, num_layers: usize) -> Result<Vec<usize>, TargetError> {
    let out_of_range = |layer: usize| TargetError::NoSuchLayer { layer, num_layers };
    match layers {
        Layers::Named(text) if text == "all" => Ok((0..num_layers).collect()),
        Layers::Named(text) => {
            let (a, b) = text
                .split_once('-')
                .ok_or_else(|| TargetError::NotARange(text.clone()))?;
            let bad_range = |_| TargetError::BadRange(text.clone());
            let (a, b): (usize, usize) =
                (a.parse().map_err(bad_range)?, b.parse().map_err(bad_range)?);
            if b >= num_layers {
                return Err(out_of_range(b));
            }
            Ok((a..=b).collect())
        }
        Layers::List(list) => list
            .iter()
            .map(|&i| {
                if (i as usize) < num_layers {
                    Ok(i as usize)
                } else {
                    Err(out_of_range(i as usize))
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(targets: &[&str], layers: Layers) -> SvdSpec {
        SvdSpec {
            targets: targets.iter().map(|s| s.to_string()).collect(),
            layers,
        }
    }

    #[test]
    fn selects_modules_and_layers() {
        let all = select(
            &spec(&[r"mlp\.(gate|up|down)_proj"], Layers::Named("all".into())),
            30,
        )
        .unwrap();
        assert_eq!(all.len(), 90);
        assert_eq!(all[0], "layers.0.mlp.gate_proj");
        let some = select(
            &spec(&["q_proj", "v_proj"], Layers::Named("2-3".into())),
            30,
        )
        .unwrap();
        assert_eq!(
            some,
            [
                "layers.2.attn.q_proj",
                "layers.2.attn.v_proj",
                "layers.3.attn.q_proj",
                "layers.3.attn.v_proj"
            ]
        );
        assert!(
            select(&spec(&["mlp"], Layers::List(vec![30])), 30)
                .unwrap_err()
                .to_string()
                .contains("layer 30 does not exist")
        );
        assert!(
            select(&spec(&["nothing"], Layers::Named("all".into())), 30)
                .unwrap_err()
                .to_string()
                .contains("match none")
        );
    }
}
