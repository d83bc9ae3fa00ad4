//! Rewards: judging a completion against its record. One module shared by evaluation and
//! training, so the two can never disagree about what is correct. A [`Reward`] is compiled once
//! from its spec (regexes built, composite parts resolved) and judges completions into a
//! [`Judgement`]: verdict, reward value, what was extracted and what the gold answer was.

pub mod extract;
mod math;
pub mod sandbox;
pub mod spec;

use std::collections::BTreeMap;

use regex::Regex;
use serde::Serialize;
use serde_json::{Map, Value};

use sandbox::{Sandbox, SandboxOutcome};
pub use spec::Verdict;
use spec::{RewardSpec, RewardValues};

/// How one completion was judged.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Judgement {
    pub verdict: Verdict,
    pub reward: f64,
    /// The answer read out of the completion, as text (`None` when unparsable).
    pub extracted: Option<String>,
    pub gold: String,
    /// Why, when the verdict needs explaining (a failed test, a timeout, a sandbox limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// A composite reward's parts: each part's name and reward (before its weight).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<(String, f64)>,
}

/// A record that cannot be judged at all (a data problem, not a wrong answer).
#[derive(Debug, Clone, thiserror::Error)]
pub enum RewardError {
    #[error("the record has no field `{0}`")]
    MissingField(String),
    #[error("record field `{field}`: expected {expected}, found {found}")]
    BadField {
        field: String,
        expected: &'static str,
        found: String,
    },
    #[error("the sandbox could not run: {0}")]
    Sandbox(#[source] sandbox::SandboxError),
}

/// A reward spec that cannot be compiled (bad regex, unknown or cyclic composite part).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct SpecError {
    /// JSON pointer below the reward's own section (e.g. `/pattern`, `/parts/1/reward`).
    pub pointer: String,
    pub message: String,
}

/// A compiled reward.
pub struct Reward {
    judge: Judge,
}

enum Judge {
    Number {
        gold: String,
        tolerance: f64,
        values: RewardValues,
    },
    Choice {
        choices: String,
        gold: String,
        values: RewardValues,
    },
    Math {
        gold: String,
        values: RewardValues,
    },
    Code {
        program: CodeFields,
        sandbox: Sandbox,
        values: RewardValues,
    },
    Regex {
        pattern: Regex,
        gold: String,
        values: RewardValues,
    },
    /// Parts by name, each with its weight.
    Composite(Vec<(String, Reward, f64)>),
}

/// Which record fields make up a code test program.
struct CodeFields {
    checks: String,
    entry_point: Option<String>,
    setup: Option<String>,
    prefix: Option<String>,
}

impl Reward {
    /// Compiles the reward `name` of `all` (composite parts are looked up there).
    pub fn compile(name: &str, all: &BTreeMap<String, RewardSpec>) -> Result<Self, SpecError> {
        Self::compile_inner(name, all, &mut vec![])
    }

    fn compile_inner(
        name: &str,
        all: &BTreeMap<String, RewardSpec>,
        path: &mut Vec<String>,
    ) -> Result<Self, SpecError> {
        let spec = all.get(name).ok_or_else(|| SpecError {
            pointer: String::new(),
            message: format!("`{name}` is not defined in `rewards`"),
        })?;
        let judge = match spec {
            RewardSpec::ExactNumber(r) => Judge::Number {
                gold: r.gold.clone(),
                tolerance: r.tolerance,
                values: r.values.clone(),
            },
            RewardSpec::MultipleChoice(r) => Judge::Choice {
                choices: r.choices.clone(),
                gold: r.gold.clone(),
                values: r.values.clone(),
            },
            RewardSpec::MathAnswer(r) => Judge::Math {
                gold: r.gold.clone(),
                values: r.values.clone(),
            },
            RewardSpec::CodeTests(r) => Judge::Code {
                program: CodeFields {
                    checks: r.checks.clone(),
                    entry_point: r.entry_point.clone(),
                    setup: r.setup.clone(),
                    prefix: r.prefix.clone(),
                },
                sandbox: Sandbox::new(r.sandbox.clone()),
                values: r.values.clone(),
            },
            RewardSpec::Regex(r) => Judge::Regex {
                pattern: Regex::new(&r.pattern).map_err(|e| SpecError {
                    pointer: "/pattern".into(),
                    message: format!("not a valid regex: {e}"),
                })?,
                gold: r.gold.clone(),
                values: r.values.clone(),
            },
            RewardSpec::Composite(r) => {
                path.push(name.to_string());
                let mut parts = Vec::new();
                for (i, part) in r.parts.iter().enumerate() {
                    let pointer = format!("/parts/{i}/reward");
                    if path.contains(&part.reward) {
                        return Err(SpecError {
                            pointer,
                            message: format!(
                                "composite rewards form a cycle: {} → {}",
                                path.join(" → "),
                                part.reward
                            ),
                        });
                    }
                    let compiled = Self::compile_inner(&part.reward, all, path)
                        .map_err(|e| SpecError { pointer, ..e })?;
                    parts.push((part.reward.clone(), compiled, part.weight));
                }
                path.pop();
                Judge::Composite(parts)
            }
        };
        Ok(Self { judge })
    }

    /// Judges one completion of `record`.
    pub fn judge(
        &self,
        completion: &str,
        record: &Map<String, Value>,
    ) -> Result<Judgement, RewardError> {
        match &self.judge {
            Judge::Number {
                gold,
                tolerance,
                values,
            } => {
                let gold_text = text_field(record, gold)?;
                let want =
                    extract::last_number(&gold_text).ok_or_else(|| RewardError::BadField {
                        field: gold.clone(),
                        expected: "a number",
                        found: gold_text.clone(),
                    })?;
                let got = extract::last_number(completion);
                let correct = got.map(|g| (g - want).abs() <= *tolerance);
                Ok(judged(
                    values,
                    correct,
                    got.map(extract::show_number),
                    extract::show_number(want),
                ))
            }
            Judge::Choice {
                choices,
                gold,
                values,
            } => {
                let options = choices_field(record, choices)?;
                let want = gold_index(record, gold, options.len())?;
                let got = extract::choice(completion, &options);
                let show = |i: usize| extract::letter(i).map(String::from).unwrap_or_default();
                Ok(judged(
                    values,
                    got.map(|g| g == want),
                    got.map(show),
                    show(want),
                ))
            }
            Judge::Math { gold, values } => {
                let want = text_field(record, gold)?;
                let got = math::answer(completion);
                let correct = got.as_deref().map(|g| math::equivalent(g, &want));
                Ok(judged(values, correct, got, want))
            }
            Judge::Regex {
                pattern,
                gold,
                values,
            } => {
                let want = text_field(record, gold)?;
                let got = extract::last_capture(pattern, completion);
                let correct = got
                    .as_deref()
                    .map(|g| extract::normalize(g) == extract::normalize(&want));
                Ok(judged(values, correct, got, want))
            }
            Judge::Code {
                program,
                sandbox,
                values,
            } => {
                let program = program.build(completion, record)?;
                if program.written.trim().is_empty() {
                    // No code at all: nothing to run.
                    return Ok(judged(values, None, None, "tests pass".into()));
                }
                let outcome = sandbox.run(&program).map_err(RewardError::Sandbox)?;
                Ok(code_judgement(values, &program.written, outcome))
            }
            Judge::Composite(parts) => {
                let judged: Vec<Judgement> = parts
                    .iter()
                    .map(|(_, r, _)| r.judge(completion, record))
                    .collect::<Result<_, _>>()?;
                Ok(combine(parts, judged))
            }
        }
    }

    /// How contained the generated code this reward runs is (`None` for rewards that run no
    /// code), for the stage's provenance.
    pub fn sandbox(&self) -> Option<Result<sandbox::Containment, sandbox::SandboxError>> {
        match &self.judge {
            Judge::Code { sandbox, .. } => Some(sandbox.containment()),
            Judge::Composite(parts) => parts.iter().find_map(|(_, r, _)| r.sandbox()),
            _ => None,
        }
    }

    /// The line a stage's summary records about its reward's sandbox (absent: no code run).
    pub fn sandbox_summary(&self) -> Option<String> {
        self.sandbox().map(|c| match c {
            Ok(c) => c.describe().to_string(),
            Err(refusal) => format!("refused: {refusal}"),
        })
    }

    /// Judges many completions; code rewards run their programs in parallel (the sandbox's
    /// `concurrency`), the rest in order.
    pub fn judge_all(
        &self,
        items: &[(&str, &Map<String, Value>)],
    ) -> Vec<Result<Judgement, RewardError>> {
        let threads = match &self.judge {
            Judge::Code { sandbox, .. } => sandbox.concurrency(),
            _ => 1,
        };
        if threads <= 1 {
            return items.iter().map(|(c, r)| self.judge(c, r)).collect();
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: Vec<std::sync::Mutex<Option<Result<Judgement, RewardError>>>> =
            items.iter().map(|_| std::sync::Mutex::new(None)).collect();
        std::thread::scope(|scope| {
            for _ in 0..threads.min(items.len()) {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((c, r)) = items.get(i) else { break };
                        let judged = self.judge(c, r);
                        *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(judged);
                    }
                });
            }
        });
        results
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .unwrap_or(Err(RewardError::Sandbox(sandbox::SandboxError::NothingRan)))
            })
            .collect()
    }

    /// Whether judging runs programs (so `validate` can say why its reward tests take time).
    pub fn runs_code(&self) -> bool {
        match &self.judge {
            Judge::Code { .. } => true,
            Judge::Composite(parts) => parts.iter().any(|(_, r, _)| r.runs_code()),
            _ => false,
        }
    }
}

/// A judgement from "correct?" (`None` = nothing could be extracted).
fn judged(
    values: &RewardValues,
    correct: Option<bool>,
    extracted: Option<String>,
    gold: String,
) -> Judgement {
    let (verdict, reward) = match correct {
        Some(true) => (Verdict::Correct, values.correct),
        Some(false) => (Verdict::Wrong, values.wrong),
        None => (Verdict::Unparsable, values.unparsable),
    };
    Judgement {
        verdict,
        reward,
        extracted,
        gold,
        detail: None,
        parts: Vec::new(),
    }
}

/// Correct when every part is, unparsable when every part is; the reward is the weighted sum.
fn combine(parts: &[(String, Reward, f64)], judged: Vec<Judgement>) -> Judgement {
    let all = |v: Verdict| judged.iter().all(|j| j.verdict == v);
    let verdict = if all(Verdict::Correct) {
        Verdict::Correct
    } else if all(Verdict::Unparsable) {
        Verdict::Unparsable
    } else {
        Verdict::Wrong
    };
    let join =
        |f: &dyn Fn(&Judgement) -> String| judged.iter().map(f).collect::<Vec<_>>().join(" | ");
    Judgement {
        verdict,
        reward: parts
            .iter()
            .zip(&judged)
            .map(|((_, _, w), j)| w * j.reward)
            .sum(),
        extracted: Some(join(&|j| j.extracted.clone().unwrap_or_default())),
        gold: join(&|j| j.gold.clone()),
        detail: None,
        parts: parts
            .iter()
            .zip(&judged)
            .map(|((name, _, _), j)| (name.clone(), j.reward))
            .collect(),
    }
}

fn code_judgement(values: &RewardValues, solution: &str, outcome: SandboxOutcome) -> Judgement {
    let mut j = judged(
        values,
        Some(outcome.passed()),
        Some(solution.to_string()),
        "tests pass".into(),
    );
    j.detail = Some(outcome.describe());
    j
}

/// A record field as text (strings as they are, numbers and other values as JSON).
fn text_field(record: &Map<String, Value>, field: &str) -> Result<String, RewardError> {
    match record.get(field) {
        None | Some(Value::Null) => Err(RewardError::MissingField(field.into())),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Ok(other.to_string()),
    }
}

/// The options of a multiple-choice record.
pub fn choices_field(record: &Map<String, Value>, field: &str) -> Result<Vec<String>, RewardError> {
    let bad = |found: &Value| RewardError::BadField {
        field: field.into(),
        expected: "a list of strings",
        found: crate::yaml::describe(found),
    };
    let value = record
        .get(field)
        .ok_or_else(|| RewardError::MissingField(field.into()))?;
    let list = value.as_array().ok_or_else(|| bad(value))?;
    list.iter()
        .map(|v| v.as_str().map(String::from).ok_or_else(|| bad(v)))
        .collect()
}

/// The gold option's index: a 0-based integer or a letter, checked against the option count.
pub fn gold_index(
    record: &Map<String, Value>,
    field: &str,
    options: usize,
) -> Result<usize, RewardError> {
    let value = record
        .get(field)
        .ok_or_else(|| RewardError::MissingField(field.into()))?;
    let index = match value {
        Value::Number(n) => n.as_u64().map(|i| i as usize),
        Value::String(s) if s.trim().len() == 1 => s
            .trim()
            .chars()
            .next()
            .and_then(|c| "ABCDEFGHIJKLMNOPQRSTUVWXYZ".find(c.to_ascii_uppercase())),
        _ => None,
    };
    index
        .filter(|&i| i < options)
        .ok_or_else(|| RewardError::BadField {
            field: field.into(),
            expected: "an option index or letter within the options",
            found: value.to_string(),
        })
}

impl CodeFields {
    /// The program that runs the tests against the completion's code.
    fn build(
        &self,
        completion: &str,
        record: &Map<String, Value>,
    ) -> Result<sandbox::Program, RewardError> {
        let written = extract::code_block(completion);
        let mut solution = written.clone();
        let checks = match record.get(&self.checks) {
            Some(Value::Array(lines)) => lines
                .iter()
                .map(|l| l.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .map(|l| l.join("\n"))
                .ok_or_else(|| RewardError::BadField {
                    field: self.checks.clone(),
                    expected: "a list of strings or a string",
                    found: "a list with other values".into(),
                })?,
            _ => text_field(record, &self.checks)?,
        };
        let optional = |f: &Option<String>| -> Result<String, RewardError> {
            match f {
                Some(field) => text_field(record, field),
                None => Ok(String::new()),
            }
        };
        let entry = optional(&self.entry_point)?;
        if !entry.is_empty() && !solution.contains(&format!("def {entry}")) {
            // A completion that only wrote the body continues the prompt's signature.
            solution = format!("{}{solution}", optional(&self.prefix)?);
        }
        Ok(sandbox::Program {
            solution,
            setup: optional(&self.setup)?,
            checks,
            entry_point: entry,
            written,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reward(yaml: &str) -> Reward {
        let spec: RewardSpec = serde_json::from_value(
            crate::yaml::LocatedDoc::parse(std::path::Path::new("r.yaml"), yaml)
                .unwrap()
                .value,
        )
        .unwrap();
        Reward::compile("r", &BTreeMap::from([("r".to_string(), spec)])).unwrap()
    }

    fn record(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn gsm8k_answers_with_the_reference_codes_failure_cases() {
        let r = reward("kind: exact_number");
        let gold = record(json!({"answer": "She pays 2*600 = 1200.\n#### 1,200"}));
        let cases = [
            ("so she pays $1,200.", Verdict::Correct),
            ("#### 1200", Verdict::Correct),
            ("The answer is -1200", Verdict::Wrong),
            ("1200.0 dollars", Verdict::Correct),
            ("1,20", Verdict::Wrong),
            ("I cannot tell", Verdict::Unparsable),
        ];
        for (completion, want) in cases {
            assert_eq!(
                r.judge(completion, &gold).unwrap().verdict,
                want,
                "{completion}"
            );
        }
        let negative = record(json!({"answer": "#### -5"}));
        assert_eq!(
            r.judge("it is -5", &negative).unwrap().verdict,
            Verdict::Correct
        );
        assert_eq!(
            r.judge("it is 5", &negative).unwrap().verdict,
            Verdict::Wrong
        );
        assert!(matches!(
            r.judge("1", &record(json!({}))).unwrap_err(),
            RewardError::MissingField(field) if field == "answer"
        ));
    }

    #[test]
    fn multiple_choice_takes_index_or_letter_gold_and_values() {
        let r = reward("kind: multiple_choice\nvalues: {correct: 1, wrong: -1, unparsable: -1}");
        let rec = record(json!({"choices": ["red", "green", "blue"], "gold": 2}));
        let j = r.judge("The answer is (C)", &rec).unwrap();
        assert_eq!(
            (j.verdict, j.reward, j.extracted.as_deref(), j.gold.as_str()),
            (Verdict::Correct, 1.0, Some("C"), "C")
        );
        assert_eq!(r.judge("green", &rec).unwrap().reward, -1.0);
        assert_eq!(
            r.judge("purple", &rec).unwrap().verdict,
            Verdict::Unparsable
        );
        let letter = record(json!({"choices": ["x", "y"], "gold": "B"}));
        assert_eq!(r.judge("B", &letter).unwrap().verdict, Verdict::Correct);
        let out_of_range = record(json!({"choices": ["x", "y"], "gold": 5}));
        assert!(matches!(
            r.judge("A", &out_of_range),
            Err(RewardError::BadField { .. })
        ));
    }

    #[test]
    fn math_regex_and_composite() {
        let math = reward("kind: math_answer");
        let rec = record(json!({"answer": "\\frac{1}{2}"}));
        assert_eq!(
            math.judge("so \\boxed{\\dfrac{1}{2}}", &rec)
                .unwrap()
                .verdict,
            Verdict::Correct
        );
        assert_eq!(
            math.judge("so \\boxed{0.5}", &rec).unwrap().verdict,
            Verdict::Correct
        );
        assert_eq!(
            math.judge("so \\boxed{2}", &rec).unwrap().verdict,
            Verdict::Wrong
        );
        let re = reward("kind: regex\npattern: 'Final: (\\w+)'");
        let rec = record(json!({"answer": "Paris"}));
        assert_eq!(
            re.judge("Final: paris", &rec).unwrap().verdict,
            Verdict::Correct
        );
        let specs: BTreeMap<String, RewardSpec> = [
            ("a", json!({"kind": "regex", "pattern": "A=(\\d)"})),
            ("b", json!({"kind": "exact_number"})),
            ("c", json!({"kind": "composite", "parts": [{"reward": "a", "weight": 0.5}, {"reward": "b"}]})),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), serde_json::from_value(v).unwrap()))
        .collect();
        let c = Reward::compile("c", &specs).unwrap();
        let j = c
            .judge("A=3 and 3", &record(json!({"answer": "3"})))
            .unwrap();
        assert_eq!((j.verdict, j.reward), (Verdict::Correct, 1.5));
        let j = c
            .judge("A=4 and 3", &record(json!({"answer": "3"})))
            .unwrap();
        assert_eq!((j.verdict, j.reward), (Verdict::Wrong, 1.0));
        assert_eq!(j.parts, [("a".to_string(), 0.0), ("b".to_string(), 1.0)]);
    }

    #[test]
    fn composite_cycles_and_bad_regexes_are_spec_errors() {
        let specs: BTreeMap<String, RewardSpec> = [
            (
                "a",
                json!({"kind": "composite", "parts": [{"reward": "b"}]}),
            ),
            (
                "b",
                json!({"kind": "composite", "parts": [{"reward": "a"}]}),
            ),
            ("r", json!({"kind": "regex", "pattern": "("})),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), serde_json::from_value(v).unwrap()))
        .collect();
        let e = Reward::compile("a", &specs).err().unwrap();
        assert_eq!(e.pointer, "/parts/0/reward");
        assert!(e.message.contains("a → b → a"), "{}", e.message);
        assert_eq!(
            Reward::compile("r", &specs).err().unwrap().pointer,
            "/pattern"
        );
    }
}
