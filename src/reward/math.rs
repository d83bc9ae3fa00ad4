//! MATH answers: reading the final answer of a solution and comparing two LaTeX answers after
//! normalisation (the usual Minerva/MATH rules, kept small), or numerically.

use std::sync::OnceLock;

use regex::Regex;

use super::extract;

/// The final answer: the last `\boxed{}`, else what follows the last "The answer is".
pub fn answer(completion: &str) -> Option<String> {
    if let Some(boxed) = extract::last_boxed(completion) {
        return Some(boxed);
    }
    static STATED: OnceLock<Regex> = OnceLock::new();
    let stated = STATED.get_or_init(|| {
        Regex::new(r"(?i)the (?:final )?answer is:?\s*\$?([^$\n]+?)\$?\s*(?:\.\s*)?$")
            .expect("valid pattern")
    });
    completion
        .lines()
        .rev()
        .find_map(|line| stated.captures(line.trim()))
        .and_then(|c| c.get(1))
        .map(|m| m.as_str().trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Whether two answers are the same after normalisation, or as numbers.
pub fn equivalent(got: &str, want: &str) -> bool {
    let (a, b) = (normalize(got), normalize(want));
    if a == b {
        return true;
    }
    match (value(&a), value(&b)) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-6 * y.abs().max(1.0),
        _ => false,
    }
}

/// Strips what does not change a MATH answer: spacing, `\left`/`\right`, `\!`, `dfrac`/`tfrac`,
/// degree signs, `\text{...}` units, a leading `x =`, surrounding `$`, a trailing period.
fn normalize(answer: &str) -> String {
    static TEXT: OnceLock<Regex> = OnceLock::new();
    let text =
        TEXT.get_or_init(|| Regex::new(r"\\(?:text|mbox|mathrm)\{([^}]*)\}").expect("valid"));
    let mut s = answer
        .trim()
        .trim_matches('$')
        .trim_end_matches('.')
        .to_string();
    for (from, to) in [
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("^\\circ", ""),
        ("^{\\circ}", ""),
        ("\\%", ""),
        ("%", ""),
        ("\\$", ""),
    ] {
        s = s.replace(from, to);
    }
    s = text.replace_all(&s, "").to_string();
    s.retain(|c| !c.is_whitespace());
    if let Some((lhs, rhs)) = s.split_once('=')
        && lhs.len() <= 2
    {
        s = rhs.to_string();
    }
    // `\frac12` → `\frac{1}{2}`
    static SHORT_FRAC: OnceLock<Regex> = OnceLock::new();
    let short = SHORT_FRAC.get_or_init(|| Regex::new(r"\\frac(\d)(\d)").expect("valid"));
    short.replace_all(&s, r"\frac{$1}{$2}").to_string()
}

/// A plain number, a `\frac{a}{b}` or `a/b` of numbers, as a value.
fn value(s: &str) -> Option<f64> {
    static FRAC: OnceLock<Regex> = OnceLock::new();
    let frac = FRAC
        .get_or_init(|| Regex::new(r"^(-?)\\frac\{(-?[\d.,]+)\}\{(-?[\d.,]+)\}$").expect("valid"));
    if let Some(c) = frac.captures(s) {
        let sign = if &c[1] == "-" { -1.0 } else { 1.0 };
        let (n, d) = (extract::parse_number(&c[2])?, extract::parse_number(&c[3])?);
        return (d != 0.0).then(|| sign * n / d);
    }
    if let Some((n, d)) = s.split_once('/') {
        let (n, d) = (plain(n)?, plain(d)?);
        return (d != 0.0).then(|| n / d);
    }
    plain(s)
}

fn plain(s: &str) -> Option<f64> {
    let digits = s.replace(',', "");
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_and_compared_like_minerva() {
        assert_eq!(
            answer(r"so \boxed{\frac{3}{4}}").as_deref(),
            Some(r"\frac{3}{4}")
        );
        assert_eq!(answer("Thus.\nThe answer is: 12").as_deref(), Some("12"));
        assert_eq!(answer("The final answer is $x^2$.").as_deref(), Some("x^2"));
        assert_eq!(answer("no idea"), None);
        let same = [
            (r"\dfrac{3}{4}", r"\frac{3}{4}"),
            ("0.75", r"\frac{3}{4}"),
            ("3/4", "0.75"),
            (r"\left( 1, 2 \right)", "(1,2)"),
            (r"90^\circ", "90"),
            (r"x = 5", "5"),
            (r"10\text{ cm}", "10"),
            ("1,000", "1000"),
            (r"\frac12", r"\frac{1}{2}"),
            (r"-\frac{1}{2}", "-0.5"),
        ];
        for (a, b) in same {
            assert!(equivalent(a, b), "{a} vs {b}");
        }
        for (a, b) in [("2", "3"), (r"\frac{1}{3}", "0.3"), ("x^2", "x^3")] {
            assert!(!equivalent(a, b), "{a} vs {b}");
        }
    }
}
