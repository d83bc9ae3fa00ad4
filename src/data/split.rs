//! Deterministic splits. Records are ordered by blake3(seed, id) and the parts taken in order
//! train, val, test. Ordering by a hash of the id (not by position) keeps a record in the same part
//! when other records are added or removed, and needs no RNG whose stream could change.

use serde_json::Number;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How records are split. Each part is a fraction (written with a decimal point, e.g. `0.8`) or a
/// count (a whole number, e.g. `100`); records left over are not used.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub train: Option<serde_json::Number>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub val: Option<serde_json::Number>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub test: Option<serde_json::Number>,
    /// Seed of the split (default: the pipeline seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

pub const PARTS: [&str; 3] = ["train", "val", "test"];

/// `ids` reordered by seed: the order splits and `limit` take records in.
pub fn seeded_order(ids: &[&str], seed: u64) -> Vec<usize> {
    let mut keyed: Vec<(blake3::Hash, usize)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut h = blake3::Hasher::new();
            h.update(&seed.to_le_bytes());
            h.update(id.as_bytes());
            (h.finalize(), i)
        })
        .collect();
    keyed.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    keyed.into_iter().map(|(_, i)| i).collect()
}

/// How many records each part gets out of `n`: fractions are floored, counts taken as written.
pub fn part_sizes(spec: &SplitSpec, n: usize) -> Result<[usize; 3], String> {
    let size = |v: &Option<Number>| -> usize {
        match v {
            None => 0,
            Some(num) if num.is_f64() => (num.as_f64().unwrap_or(0.0) * n as f64).floor() as usize,
            Some(num) => num.as_u64().unwrap_or(0) as usize,
        }
    };
    let sizes = [size(&spec.train), size(&spec.val), size(&spec.test)];
    let total: usize = sizes.iter().sum();
    if total > n {
        return Err(format!(
            "the split asks for {total} records (train {}, val {}, test {}) but only {n} are available",
            sizes[0], sizes[1], sizes[2]
        ));
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(train: serde_json::Value, val: serde_json::Value) -> SplitSpec {
        serde_json::from_value(serde_json::json!({"train": train, "val": val})).unwrap()
    }

    #[test]
    fn fractions_and_counts() {
        assert_eq!(
            part_sizes(&spec(0.8.into(), 0.2.into()), 10).unwrap(),
            [8, 2, 0]
        );
        assert_eq!(
            part_sizes(&spec(3.into(), 0.5.into()), 10).unwrap(),
            [3, 5, 0]
        );
        assert!(part_sizes(&spec(8.into(), 3.into()), 10).is_err());
    }

    #[test]
    fn order_depends_on_seed_and_is_stable_under_additions() {
        let ids = ["a", "b", "c", "d", "e", "f"];
        let o1 = seeded_order(&ids, 1);
        assert_eq!(o1, seeded_order(&ids, 1));
        assert_ne!(o1, seeded_order(&ids, 2));
        let fewer = seeded_order(&ids[..5], 1);
        let names = |o: &[usize], src: &[&str]| {
            o.iter()
                .map(|&i| src[i].to_string())
                .filter(|s| s != "f")
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&o1, &ids), names(&fewer, &ids[..5]));
    }
}
