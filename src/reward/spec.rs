//! A reward's configuration as a pipeline's `rewards:` section writes it (serde + schemars: part
//! of the pipeline file's schema), owned here so the reward module needs nothing from the
//! pipeline.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A reward function: how a completion is judged against its record. Its answer extractor is
/// the one evaluation uses, so a reward and an evaluation never disagree about what is correct.
/// Each kind has its own options; every kind takes `values` and `tests`. (Each variant repeats
/// those two fields: serde cannot flatten a shared struct into a variant and still refuse
/// unknown keys, and the schema's `additionalProperties: false` is what gives located errors.)
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RewardSpec {
    /// The last number in the completion (or the one after `####`) equals the gold number
    /// (GSM8K). Signs, thousands separators, decimals, `$` and trailing units are handled.
    ExactNumber(NumberReward),
    /// The chosen option ("the answer is (C)", "Answer: C", a lone letter, or the option's text)
    /// is the gold option (ARC, basic skills). An unparsable answer is wrong, never a guess.
    MultipleChoice(ChoiceReward),
    /// The last `\boxed{}` (or "The answer is ...") equals the gold answer after normalisation,
    /// or numerically (MATH).
    MathAnswer(MathReward),
    /// The generated code passes the record's tests in a sandboxed `python3` (MBPP, HumanEval).
    CodeTests(CodeReward),
    /// A regex's first capture group, normalised, equals the gold field, normalised.
    Regex(RegexReward),
    /// A weighted sum of other rewards (by name); correct when every part is.
    Composite(CompositeReward),
}

/// Reward values for each verdict; accuracy counts `correct` verdicts whatever the values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RewardValues {
    pub correct: f64,
    pub wrong: f64,
    /// No answer could be extracted.
    pub unparsable: f64,
}

impl Default for RewardValues {
    fn default() -> Self {
        Self {
            correct: 1.0,
            wrong: 0.0,
            unparsable: 0.0,
        }
    }
}

/// A unit test of a reward, run by `tsq validate`: this completion, for a record with these
/// fields, must get this verdict.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardTest {
    pub completion: String,
    /// The record's fields (as the dataset card maps them), e.g. `{answer: "#### 42"}`.
    pub record: serde_json::Map<String, serde_json::Value>,
    pub expect: Verdict,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Correct,
    Wrong,
    Unparsable,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NumberReward {
    /// Record field holding the gold answer (a number, or text whose last number is the answer).
    #[serde(default = "field_answer")]
    pub gold: String,
    /// Largest absolute difference still counted as equal.
    #[serde(default = "default_tolerance")]
    #[schemars(range(min = 0.0))]
    pub tolerance: f64,
    #[serde(default)]
    pub values: RewardValues,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<RewardTest>,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChoiceReward {
    /// Record field holding the options (a list of strings).
    #[serde(default = "field_choices")]
    pub choices: String,
    /// Record field holding the gold option: its 0-based index or its letter.
    #[serde(default = "field_gold")]
    pub gold: String,
    #[serde(default)]
    pub values: RewardValues,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<RewardTest>,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MathReward {
    /// Record field holding the gold answer (LaTeX).
    #[serde(default = "field_answer")]
    pub gold: String,
    #[serde(default)]
    pub values: RewardValues,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<RewardTest>,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CodeReward {
    /// Record field holding the checks: a list of assert statements (MBPP) or a test program
    /// defining `check(candidate)` (HumanEval, with `entry_point`).
    #[serde(default = "field_tests")]
    pub checks: String,
    /// Record field naming the function `check` is called with (HumanEval); absent for MBPP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_point: Option<String>,
    /// Record field holding code run after the solution and before the checks (MBPP's
    /// `test_setup_code`, which may use what the solution defines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup: Option<String>,
    /// Record field holding the prompt's code that the completion continues (HumanEval's
    /// signature and docstring), prepended when the completion does not define the function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default)]
    pub sandbox: SandboxSpec,
    #[serde(default)]
    pub values: RewardValues,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<RewardTest>,
}

/// Limits of the `python3` sandbox that runs generated code.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxSpec {
    /// Wall-clock limit per program, seconds.
    #[schemars(range(min = 0.1, max = 600.0))]
    pub timeout_s: f64,
    /// CPU-time limit per program, seconds.
    #[schemars(range(min = 1, max = 600))]
    pub cpu_s: u64,
    /// Address-space limit, MiB.
    #[schemars(range(min = 64, max = 65536))]
    pub memory_mb: u64,
    /// Largest file the program may write, MiB.
    #[schemars(range(min = 0, max = 1024))]
    pub file_mb: u64,
    /// Most processes (threads included) the sandbox user may have at once.
    #[schemars(range(min = 1, max = 4096))]
    pub processes: u64,
    /// Programs run at once.
    #[schemars(range(min = 1, max = 64))]
    pub concurrency: usize,
    /// Bytes of stdout / stderr kept per program.
    #[schemars(range(min = 0, max = 1048576))]
    pub output_bytes: usize,
    /// `full` (the default): programs run in a jail (namespaces, a read-only minimal root, no
    /// network, a private uid as root), and are refused where none can be built. `none` runs
    /// them without one (rlimits and a system-call filter only): unsafe, see docs/security.md.
    pub isolation: SandboxIsolation,
}

/// How generated code is contained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxIsolation {
    #[default]
    Full,
    None,
}

impl Default for SandboxSpec {
    fn default() -> Self {
        Self {
            timeout_s: 10.0,
            cpu_s: 10,
            memory_mb: 1024,
            file_mb: 16,
            processes: 64,
            concurrency: 2,
            output_bytes: 4096,
            isolation: SandboxIsolation::Full,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegexReward {
    /// A regex with one capture group; the last match in the completion is the answer.
    #[schemars(length(min = 1))]
    pub pattern: String,
    /// Record field holding the gold answer.
    #[serde(default = "field_answer")]
    pub gold: String,
    #[serde(default)]
    pub values: RewardValues,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<RewardTest>,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CompositeReward {
    #[schemars(length(min = 1))]
    pub parts: Vec<CompositePart>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<RewardTest>,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CompositePart {
    /// Name of another reward in `rewards`.
    pub reward: String,
    #[serde(default = "default_weight")]
    pub weight: f64,
}

fn field_answer() -> String {
    "answer".into()
}
fn field_choices() -> String {
    "choices".into()
}
fn field_gold() -> String {
    "gold".into()
}
fn field_tests() -> String {
    "tests".into()
}
fn default_tolerance() -> f64 {
    1e-6
}
fn default_weight() -> f64 {
    1.0
}

impl RewardSpec {
    /// The kind's name as written in pipeline files.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ExactNumber(_) => "exact_number",
            Self::MultipleChoice(_) => "multiple_choice",
            Self::MathAnswer(_) => "math_answer",
            Self::CodeTests(_) => "code_tests",
            Self::Regex(_) => "regex",
            Self::Composite(_) => "composite",
        }
    }

    /// The reward's unit tests.
    pub fn tests(&self) -> &[RewardTest] {
        match self {
            Self::ExactNumber(r) => &r.tests,
            Self::MultipleChoice(r) => &r.tests,
            Self::MathAnswer(r) => &r.tests,
            Self::CodeTests(r) => &r.tests,
            Self::Regex(r) => &r.tests,
            Self::Composite(r) => &r.tests,
        }
    }
}
