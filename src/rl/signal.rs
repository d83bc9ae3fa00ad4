//! What a training run's metrics lines say to its user: the progress line of a step, and a
//! warning when steps carry no reward signal. Derived from the lines alone, so a resumed run
//! says what an uninterrupted one would.

use serde_json::Value;

use super::spec::Baseline;
use crate::reward::spec::RewardValues;

/// Steps in a row with most groups uniform before the trainer warns.
const NO_SIGNAL_STEPS: usize = 3;
/// Steps after a warning before the next one.
const WARN_AGAIN_AFTER: usize = 12;

/// A warning when most prompt groups of the last [`NO_SIGNAL_STEPS`] steps got equal rewards for
/// all their samples: under a group baseline those groups have no advantage, so the steps learn
/// (next to) nothing. (Without a baseline every reward is its own advantage: no warning.)
/// Derived from the metrics lines alone, so a resumed run warns as an uninterrupted one.
pub fn no_signal_warning(
    lines: &[Value],
    baseline: Baseline,
    values: &RewardValues,
) -> Option<String> {
    if baseline == Baseline::None {
        return None;
    }
    let frac = |line: &Value| {
        line.pointer("/rollout/frac_reward_zero_std")
            .and_then(Value::as_f64)
            .unwrap_or(0.0)
    };
    let streak = lines.iter().rev().take_while(|l| frac(l) > 0.5).count();
    // Earlier lines (the current one is the last) that already carry a warning.
    let earlier = &lines[..lines.len().saturating_sub(1)];
    let warned_lately =
        (earlier.iter().rev().take(WARN_AGAIN_AFTER)).any(|l| l.get("warning").is_some());
    if streak < NO_SIGNAL_STEPS || warned_lately {
        return None;
    }
    let recent = &lines[lines.len() - streak..];
    let mean = |f: &dyn Fn(&Value) -> f64| recent.iter().map(f).sum::<f64>() / streak as f64;
    let reward = mean(&|l| {
        l.pointer("/rollout/reward")
            .and_then(Value::as_f64)
            .unwrap_or(0.0)
    });
    // Where the mean reward sits between a wrong and a right answer.
    let span = values.correct - values.wrong;
    let right = if span.abs() > 0.0 {
        (reward - values.wrong) / span
    } else {
        0.5
    };
    let why = if right > 0.9 {
        "nearly every sample is right: the task is too easy for this model"
    } else if right < 0.1 {
        "nearly every sample is wrong: the task is too hard, or the reward never matches the completions (look at a few with an evaluation in generate mode)"
    } else {
        "the samples of a prompt tend to agree"
    };
    Some(format!(
        "for {streak} steps {:.0}% of prompt groups got the same reward for every sample (mean reward {reward:.2}) and taught nothing: {why}. Raise `samples_per_prompt` or `temperature`, change the data or its prompt, or use `rollout: options` on multiple-choice data",
        100.0 * mean(&frac)
    ))
}

/// The progress line of a step.
pub fn step_message(line: &Value) -> String {
    let num = |key: &str| line.pointer(key).and_then(Value::as_f64);
    let mut parts = Vec::new();
    if let Some(r) = num("/rollout/reward") {
        parts.push(format!("reward {r:.3}"));
    }
    if let Some(l) = num("/loss") {
        parts.push(format!("loss {l:.4}"));
    }
    if let Some(v) = num("/val_accuracy") {
        parts.push(format!("val {v:.3}"));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The warning comes after three uniform steps in a row, says why from the mean reward,
    /// and is not repeated every step.
    #[test]
    fn a_run_without_reward_signal_is_warned_about() {
        let values = RewardValues::default();
        let line = |frac: f64, reward: f64| json!({"rollout": {"frac_reward_zero_std": frac, "reward": reward}});
        let mut lines = vec![line(0.9, 0.0), line(0.2, 0.5)];
        let warnings: Vec<Option<String>> = (0..16)
            .map(|_| {
                lines.push(line(0.875, 0.02));
                let warning = no_signal_warning(&lines, Baseline::Rloo, &values);
                if let Some(w) = &warning {
                    lines.last_mut().unwrap()["warning"] = json!(w);
                }
                warning
            })
            .collect();
        let at: Vec<usize> = (0..16).filter(|&i| warnings[i].is_some()).collect();
        assert_eq!(
            at,
            vec![2, 15],
            "after 3 uniform steps, then 12 steps later"
        );
        let text = warnings[2].as_deref().unwrap();
        assert!(
            text.contains("for 3 steps 88%") && text.contains("too hard"),
            "{text}"
        );
        let easy = [
            line(0.0, 0.5),
            line(0.6, 0.97),
            line(0.7, 0.95),
            line(0.8, 0.99),
        ];
        let easy = no_signal_warning(&easy, Baseline::Rloo, &values).unwrap();
        assert!(easy.contains("too easy"), "{easy}");
    }
}
