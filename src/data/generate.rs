//! Built-in dataset generators: a card with `generator:` instead of `source:` gets its rows from
//! here. Rows are a pure function of the card's parameters (seeded), so the card file's hash plus
//! [`GENERATOR_VERSION`] identify the data exactly, and nothing is downloaded.
//!
//! Arithmetic exists because the shipped basic-skills arithmetic set is at chance for SmolLM2
//! however it is asked (docs/benchmarks.md): a task where the base model is above chance but far
//! from perfect needs problems of a difficulty we choose.

use std::collections::HashSet;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Bumped when the same parameters would generate different rows.
pub const GENERATOR_VERSION: u32 = 1;

/// Operands are bounded so every result fits an i64 and the count check stays cheap.
const MAX_OPERAND: i64 = 1_000_000;
const MAX_COUNT: u64 = 1_000_000;
/// Up to this many distinct problems, all are listed and shuffled; above it (then at least
/// twice `MAX_COUNT`), problems are drawn with rejection.
const ENUMERATE_UP_TO: u128 = 2 * MAX_COUNT as u128;

/// A built-in generator of records.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Generator {
    /// Binary arithmetic problems `a op b` with distinct (unordered for + and ×) operand pairs, so
    /// no problem appears in two splits.
    Arithmetic(ArithmeticSpec),
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ArithmeticSpec {
    /// Number of problems.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub count: u64,
    /// Seed of the problems (independent of the pipeline's seed, which orders the split).
    pub seed: u64,
    /// Operations drawn uniformly.
    #[serde(default = "all_operations")]
    #[schemars(length(min = 1))]
    pub operations: Vec<Operation>,
    /// Smallest operand.
    #[serde(default)]
    #[schemars(range(min = -1_000_000, max = 1_000_000))]
    pub min: i64,
    /// Largest operand.
    #[schemars(range(min = -1_000_000, max = 1_000_000))]
    pub max: i64,
    /// Allow subtractions with a negative result (otherwise the larger operand comes first).
    #[serde(default)]
    pub negative_results: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Operation {
    #[serde(rename = "+")]
    Add,
    #[serde(rename = "-")]
    Subtract,
    #[serde(rename = "*")]
    Multiply,
}

fn all_operations() -> Vec<Operation> {
    vec![Operation::Add, Operation::Subtract, Operation::Multiply]
}

impl Operation {
    fn symbol(self) -> &'static str {
        match self {
            Self::Add => "+",
            Self::Subtract => "-",
            Self::Multiply => "*",
        }
    }

    fn apply(self, a: i64, b: i64) -> i64 {
        match self {
            Self::Add => a + b,
            Self::Subtract => a - b,
            Self::Multiply => a * b,
        }
    }

    fn commutes(self) -> bool {
        self != Self::Subtract
    }
}

impl Generator {
    /// Checks the parameters; the message names the field at fault.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        match self {
            Self::Arithmetic(spec) => spec.check(),
        }
    }

    /// The rows, each a JSON object (fields listed in the card's `fields:` map onto them).
    pub fn rows(&self) -> Vec<Value> {
        match self {
            Self::Arithmetic(spec) => spec.rows(),
        }
    }

    /// What identifies the generating code (the card file's hash covers the parameters).
    pub fn identity(&self) -> String {
        match self {
            Self::Arithmetic(_) => format!("generator:arithmetic/v{GENERATOR_VERSION}"),
        }
    }
}

impl ArithmeticSpec {
    fn check(&self) -> Result<(), (&'static str, String)> {
        if self.min > self.max {
            return Err((
                "max",
                format!("`max` ({}) is below `min` ({})", self.max, self.min),
            ));
        }
        if self.min.abs() > MAX_OPERAND || self.max.abs() > MAX_OPERAND {
            return Err(("max", format!("operands are limited to ±{MAX_OPERAND}")));
        }
        if self.count > MAX_COUNT {
            return Err(("count", format!("at most {MAX_COUNT} problems")));
        }
        let distinct = self.distinct_problems();
        if u128::from(self.count) > distinct {
            return Err((
                "count",
                format!(
                    "{} problems asked, but these operations and operands give only {distinct} distinct ones: widen `min`..`max` or lower `count`",
                    self.count
                ),
            ));
        }
        Ok(())
    }

    /// Number of distinct problems the parameters allow.
    fn distinct_problems(&self) -> u128 {
        let n = (self.max - self.min + 1).max(0) as u128;
        let unordered = n * (n + 1) / 2;
        self.operations()
            .iter()
            .map(|op| match op {
                Operation::Subtract if !self.negative_results => unordered,
                Operation::Subtract => n * n,
                _ => unordered,
            })
            .sum()
    }

    /// The problems: drawn at random while they are many, else all of them shuffled (a draw
    /// with rejection would slow down as it used them up).
    fn rows(&self) -> Vec<Value> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let problems = if self.distinct_problems() <= ENUMERATE_UP_TO {
            let mut all = self.all_problems();
            all.shuffle(&mut rng);
            all.truncate(self.count as usize);
            all
        } else {
            self.drawn_problems(&mut rng)
        };
        problems
            .into_iter()
            .enumerate()
            .map(|(i, (op, a, b))| {
                // Distinct up to order; shown in either order.
                let swap = op.commutes() && rng.random_bool(0.5);
                let (a, b) = if swap { (b, a) } else { (a, b) };
                problem(i, op, a, b)
            })
            .collect()
    }

    fn operations(&self) -> Vec<Operation> {
        let mut ops = self.operations.clone();
        ops.sort_by_key(|o| o.symbol());
        ops.dedup();
        ops
    }

    fn all_problems(&self) -> Vec<(Operation, i64, i64)> {
        let mut all = Vec::new();
        for op in self.operations() {
            for a in self.min..=self.max {
                for b in self.min..=self.max {
                    let ordered = match op {
                        Operation::Subtract => self.negative_results || a >= b,
                        _ => a <= b,
                    };
                    if ordered {
                        all.push((op, a, b));
                    }
                }
            }
        }
        all
    }

    /// Distinct problems by rejection; [`Self::check`] keeps `count` far below their number.
    fn drawn_problems(&self, rng: &mut ChaCha8Rng) -> Vec<(Operation, i64, i64)> {
        let ops = self.operations();
        let mut seen = HashSet::new();
        while (seen.len() as u64) < self.count {
            let op = ops[rng.random_range(0..ops.len())];
            let (a, b) = (
                rng.random_range(self.min..=self.max),
                rng.random_range(self.min..=self.max),
            );
            let key = match op {
                Operation::Subtract if !self.negative_results => (op, a.max(b), a.min(b)),
                Operation::Subtract => (op, a, b),
                _ => (op, a.min(b), a.max(b)),
            };
            seen.insert(key);
        }
        let mut drawn: Vec<_> = seen.into_iter().collect();
        // A HashSet's order is not seeded: sort, then shuffle with the seed.
        drawn.sort_by_key(|&(op, a, b)| (op.symbol(), a, b));
        drawn.shuffle(rng);
        drawn
    }
}

fn problem(index: usize, op: Operation, a: i64, b: i64) -> Value {
    let operand = |x: i64| {
        if x < 0 {
            format!("({x})")
        } else {
            x.to_string()
        }
    };
    let expression = format!("{} {} {}", operand(a), op.symbol(), operand(b));
    json!({
        "id": format!("arithmetic-{index:06}"),
        "question": format!("What is {expression}?"),
        "expression": expression,
        "answer": op.apply(a, b),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(count: u64, min: i64, max: i64) -> ArithmeticSpec {
        ArithmeticSpec {
            count,
            seed: 3,
            operations: all_operations(),
            min,
            max,
            negative_results: false,
        }
    }

    #[test]
    fn problems_are_distinct_correct_and_seeded() {
        let s = spec(300, 0, 20);
        let rows = s.rows();
        assert_eq!(rows.len(), 300);
        assert_eq!(rows, s.rows(), "same seed, same rows");
        let mut keys = HashSet::new();
        for row in &rows {
            let expr = row["expression"].as_str().unwrap();
            let parts: Vec<&str> = expr.split(' ').collect();
            let (a, b): (i64, i64) = (parts[0].parse().unwrap(), parts[2].parse().unwrap());
            let expected = match parts[1] {
                "+" => a + b,
                "-" => a - b,
                _ => a * b,
            };
            assert_eq!(row["answer"], expected, "{expr}");
            assert!(expected >= 0, "no negative results unless asked: {expr}");
            let (lo, hi) = if parts[1] == "-" {
                (a, b)
            } else {
                (a.min(b), a.max(b))
            };
            assert!(
                keys.insert((parts[1].to_string(), lo, hi)),
                "repeated {expr}"
            );
            assert_eq!(row["question"], format!("What is {expr}?"));
        }
        assert_ne!(rows, ArithmeticSpec { seed: 4, ..s }.rows());
    }

    #[test]
    fn negative_operands_are_bracketed() {
        let row = problem(0, Operation::Subtract, 3, -4);
        assert_eq!(row["expression"], "3 - (-4)");
        assert_eq!(row["answer"], 7);
    }

    #[test]
    fn every_problem_can_be_asked_once() {
        // 0..=3 with three operations: 10 + 10 + 10 distinct problems.
        let rows = spec(30, 0, 3).rows();
        let mut expressions: Vec<&str> = rows
            .iter()
            .map(|r| r["expression"].as_str().unwrap())
            .collect();
        expressions.sort_unstable();
        expressions.dedup();
        assert_eq!(expressions.len(), 30);
    }

    /// Wide ranges are drawn, not listed; still distinct and seeded.
    #[test]
    fn wide_ranges_are_drawn() {
        let s = spec(200, -MAX_OPERAND, MAX_OPERAND);
        assert!(s.distinct_problems() > ENUMERATE_UP_TO);
        let rows = s.rows();
        assert_eq!(rows, s.rows());
        let mut ids: Vec<&str> = rows
            .iter()
            .map(|r| r["expression"].as_str().unwrap())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 200);
    }

    #[test]
    fn impossible_counts_and_ranges_are_refused() {
        assert!(spec(30, 0, 3).check().is_ok());
        assert_eq!(spec(31, 0, 3).check().unwrap_err().0, "count");
        assert_eq!(spec(1, 5, 2).check().unwrap_err().0, "max");
        assert_eq!(spec(1, 0, 2_000_000).check().unwrap_err().0, "max");
    }
}
