//! Answer extractors: each way of reading an answer out of a completion, written once. Rewards
//! (training) and evaluation both call these, so they cannot disagree about what was answered.

use std::sync::OnceLock;

use regex::Regex;

fn cached(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).expect("extractor patterns are valid"))
}

/// A number as written: optional sign, thousands separators (`1,234`), decimals, `$` before it.
fn number_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    cached(
        &RE,
        r"(?:^|[^\w.])([-+−]?)\$?\s?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)",
    )
}

/// Parses one number's text (`-1,234.5`, `$12`, `3.`) to a value.
pub fn parse_number(text: &str) -> Option<f64> {
    let caps = number_regex().captures(text.trim())?;
    number_of(&caps)
}

fn number_of(caps: &regex::Captures) -> Option<f64> {
    let digits = caps.get(2)?.as_str().replace(',', "");
    let value: f64 = digits.parse().ok()?;
    let negative = matches!(caps.get(1).map(|m| m.as_str()), Some("-" | "−"));
    Some(if negative { -value } else { value })
}

/// The answer number of a completion: the one after the last `####` if there is one, else the
/// last number in the text. Units and currency around it are ignored.
pub fn last_number(text: &str) -> Option<f64> {
    let scope = match text.rfind("####") {
        Some(i) => &text[i + 4..],
        None => text,
    };
    let found = number_regex()
        .captures_iter(scope)
        .filter_map(|c| number_of(&c))
        .collect::<Vec<_>>();
    match text.rfind("####") {
        // After `####` the answer is the first number, not a later one in a trailing remark.
        Some(_) => found.first().copied(),
        None => found.last().copied(),
    }
}

/// Formats a number without a needless fractional part (`42`, `-1.5`).
pub fn show_number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

const LETTERS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// The letter naming option `index` (`0` → `A`).
pub fn letter(index: usize) -> Option<char> {
    LETTERS.chars().nth(index)
}

/// The option a completion chose among `choices`, as an index, or `None` if it chose none
/// clearly. Tried in order: an explicit statement ("the answer is (C)", "Answer: C"), a lone
/// letter ("C", "(C).", "C) text"), then the option's text when exactly one option appears.
/// Never a guess: an answer naming no valid option is unparsable.
pub fn choice(text: &str, choices: &[String]) -> Option<usize> {
    let valid = |c: char| LETTERS.find(c).filter(|&i| i < choices.len());
    // The keyword in any case, the letter in capitals: "the answer is a cat" names no option.
    static STATED: OnceLock<Regex> = OnceLock::new();
    let stated = cached(
        &STATED,
        r#"(?i:answer|option|choice)\s*(?i:is|:)?\s*(?i:option\s*)?[:\s]*[\(\["'*]*\s*([A-Z])\s*[\)\]"'*]*(?:[\s.,:;!]|$)"#,
    );
    if let Some(i) = stated
        .captures_iter(text)
        .filter_map(|c| c.get(1)?.as_str().chars().next())
        .filter_map(valid)
        .last()
    {
        return Some(i);
    }
    static LONE: OnceLock<Regex> = OnceLock::new();
    let lone = cached(&LONE, r"^\s*[\(\[]?([A-Z])(?:[\)\]\.:]|\s|$)");
    let first_line = text.trim_start().lines().next().unwrap_or("");
    if let Some(i) = lone
        .captures(first_line)
        .and_then(|c| c.get(1)?.as_str().chars().next())
        .and_then(valid)
    {
        // "A cat is..." is prose, not the letter A: a lone letter stands alone or is marked.
        let rest = first_line.trim_start().trim_start_matches(['(', '[']);
        let marked = rest.len() == 1 || rest[1..].starts_with([')', ']', '.', ':']);
        if marked || first_line.trim().len() == 1 {
            return Some(i);
        }
    }
    option_text(text, choices)
}

/// The one option whose text the completion contains (normalised, as whole words), if exactly
/// one does.
fn option_text(text: &str, choices: &[String]) -> Option<usize> {
    let said = normalize(text);
    let words = |s: &str| format!(" {s} ");
    let exact: Vec<usize> = (0..choices.len())
        .filter(|&i| normalize(&choices[i]) == said)
        .collect();
    if let [i] = exact[..] {
        return Some(i);
    }
    let contained: Vec<usize> = (0..choices.len())
        .filter(|&i| {
            let c = normalize(&choices[i]);
            !c.is_empty() && words(&said).contains(&words(&c))
        })
        .collect();
    // An option contained in another ("4" in "14") must not count twice: keep the longest ones.
    let longest: Vec<usize> = contained
        .iter()
        .copied()
        .filter(|&i| {
            let c = normalize(&choices[i]);
            !contained
                .iter()
                .any(|&j| j != i && words(&normalize(&choices[j])).contains(&words(&c)))
        })
        .collect();
    match longest[..] {
        [i] => Some(i),
        _ => None,
    }
}

/// Lowercase, punctuation and articles dropped, whitespace collapsed: the comparison form of a
/// short free-text answer.
pub fn normalize(text: &str) -> String {
    let lowered: String = text
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c.is_whitespace() || c == '.' || c == '-' {
                c
            } else {
                ' '
            }
        })
        .collect();
    lowered
        .split_whitespace()
        .map(|w| w.trim_end_matches('.'))
        .filter(|w| !w.is_empty() && !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The content of the last `\boxed{...}` (or `\fbox{...}`), braces balanced.
pub fn last_boxed(text: &str) -> Option<String> {
    let start = ["\\boxed", "\\fbox"]
        .iter()
        .filter_map(|tag| text.rfind(tag).map(|i| i + tag.len()))
        .max()?;
    let rest = text[start..].trim_start();
    if let Some(body) = rest.strip_prefix('{') {
        let mut depth = 1usize;
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(body[..i].trim().to_string());
                    }
                }
                _ => {}
            }
        }
        None
    } else {
        // `\boxed 5`: the answer is the next token.
        rest.split_whitespace()
            .next()
            .map(|t| t.trim_end_matches(['$', '.']).to_string())
    }
}

/// The last match of `pattern`'s first capture group (or of the whole pattern without groups).
pub fn last_capture(pattern: &Regex, text: &str) -> Option<String> {
    pattern
        .captures_iter(text)
        .last()
        .and_then(|c| c.get(1).or_else(|| c.get(0)))
        .map(|m| m.as_str().trim().to_string())
}

/// The first fenced code block (```python ... ``` or ``` ... ```), else the text itself.
pub fn code_block(text: &str) -> String {
    static FENCE: OnceLock<Regex> = OnceLock::new();
    let fence = cached(&FENCE, r"(?s)```[A-Za-z0-9_+-]*[ \t]*\n(.*?)(?:```|$)");
    match fence.captures(text).and_then(|c| c.get(1)) {
        Some(m) => m.as_str().to_string(),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_number_reads_signs_separators_and_markers() {
        let cases: &[(&str, Option<f64>)] = &[
            ("The answer is 42.", Some(42.0)),
            ("#### 1,234", Some(1234.0)),
            ("costs $1,234.50 in total", Some(1234.5)),
            ("she lost 5 and ends at -3", Some(-3.0)),
            ("−7 degrees", Some(-7.0)),
            ("So 3 + 4 = 7 apples", Some(7.0)),
            ("#### 18\nThat was 2 steps", Some(18.0)),
            ("answer: 0.5", Some(0.5)),
            ("about .75 of it", Some(0.75)),
            ("12,34 is not a separator", Some(34.0)),
            ("x2 and y3", None),
            ("no number here", None),
            ("the year 2,024 had 1,000,000 people", Some(1_000_000.0)),
            ("a range 5-6", Some(6.0)),
        ];
        for (text, want) in cases {
            assert_eq!(last_number(text), *want, "{text:?}");
        }
    }

    #[test]
    fn choice_reads_statements_letters_and_option_text() {
        let opts: Vec<String> = ["dog", "cat", "14", "4"].map(String::from).to_vec();
        let cases: &[(&str, Option<usize>)] = &[
            ("The answer is (C)", Some(2)),
            ("the answer is B.", Some(1)),
            ("Answer: D", Some(3)),
            (
                "I think the answer is (A), no wait, the answer is (B)",
                Some(1),
            ),
            ("B", Some(1)),
            ("(D).", Some(3)),
            ("C) 14", Some(2)),
            ("A cat is an animal", Some(1)),
            ("cat", Some(1)),
            ("It is 14.", Some(2)),
            ("The answer is (E)", None),
            ("The answer is \"B\".", Some(1)),
            ("The answer is **C**", Some(2)),
            ("The answer is (X).", None),
            ("I don't know", None),
            ("dog or cat", None),
            ("the answer is a cat", Some(1)),
            ("concatenate", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(choice(text, &opts), *want, "{text:?}");
        }
    }

    #[test]
    fn boxed_keeps_nested_braces() {
        let cases: &[(&str, Option<&str>)] = &[
            (r"so \boxed{\frac{1}{2}}.", Some(r"\frac{1}{2}")),
            (r"\boxed{1} then \boxed{ 2 }", Some("2")),
            (r"\boxed 5$", Some("5")),
            (r"\fbox{x}", Some("x")),
            (r"\boxed{unclosed", None),
            ("nothing", None),
        ];
        for (text, want) in cases {
            assert_eq!(last_boxed(text).as_deref(), *want, "{text:?}");
        }
    }

    #[test]
    fn normalize_and_code_blocks() {
        assert_eq!(normalize("  The Cat, sat! "), "cat sat");
        assert_eq!(
            code_block("Here:\n```python\ndef f():\n    return 1\n```\nDone"),
            "def f():\n    return 1\n"
        );
        assert_eq!(code_block("def f(): pass"), "def f(): pass");
        let re = Regex::new(r"final: (\w+)").unwrap();
        assert_eq!(
            last_capture(&re, "final: a ... final: b").as_deref(),
            Some("b")
        );
    }
}
