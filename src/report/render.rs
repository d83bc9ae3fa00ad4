//! Rendering a collected [`Report`] with minijinja. The built-in templates are
//! `templates/reports/report.md.jinja` and `report.html.jinja` (compiled in, so `tsq report`
//! works anywhere); a pipeline's `report.templates` may replace either. Templates see `report`
//! (the collected data), `charts` (id, section, title, svg) and `tsq` (the version).

use minijinja::{AutoEscape, Environment, context};

use super::ReportError;
use super::charts::{self, Axes, Series};
use super::view::{Report, TrainStep};

pub const MARKDOWN_TEMPLATE: &str = include_str!("../../templates/reports/report.md.jinja");
pub const HTML_TEMPLATE: &str = include_str!("../../templates/reports/report.html.jinja");

/// One chart of the report, drawn.
#[derive(Debug, serde::Serialize)]
pub struct Chart {
    /// File stem when written beside `report.md` (`charts/<id>.svg`).
    pub id: String,
    /// The report section it belongs to: `training`, `experts`, `adaptation`.
    pub section: &'static str,
    pub title: String,
    pub svg: String,
}

/// Every chart the report's data allows, and a note for each one that could not be drawn.
pub fn charts(report: &Report) -> (Vec<Chart>, Vec<String>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    let mut add = |id: String, section, title: String, svg: Result<String, ReportError>| match svg {
        Ok(svg) => out.push(Chart {
            id,
            section,
            title,
            svg,
        }),
        Err(e) => problems.push(format!("{title}: {e}")),
    };
    for (id, title, y, value, spread) in TRAINING_CHARTS {
        let series: Vec<Series> = report
            .training
            .iter()
            .map(|t| {
                let steps = t.steps.iter().filter(|s| value(s).is_some());
                Series {
                    name: t.expert.clone(),
                    points: steps
                        .clone()
                        .map(|s| (s.step as f64, value(s).unwrap_or(0.0)))
                        .collect(),
                    band: steps
                        .filter_map(|s| {
                            Some((
                                s.step as f64,
                                value(s)? - spread(s)?,
                                value(s)? + spread(s)?,
                            ))
                        })
                        .collect(),
                }
            })
            // A KL of zero at every step was not measured (option rollouts, no KL term); other
            // metrics are shown whatever they are.
            .filter(|s| id != "kl" || s.points.iter().any(|p| p.1 != 0.0))
            .filter(|s| !s.points.is_empty())
            .collect();
        if !series.is_empty() {
            let axes = Axes {
                title,
                x: "step",
                y,
            };
            add(
                format!("training-{id}"),
                "training",
                title.to_string(),
                charts::lines(&axes, &series),
            );
        }
    }
    if !report.spectra.is_empty() {
        let series: Vec<Series> = report
            .spectra
            .iter()
            .map(|s| Series {
                // `layers.15.mlp.down_proj` → `15 down_proj`: short enough for the legend.
                name: s
                    .target
                    .trim_start_matches("layers.")
                    .replacen(".mlp.", " ", 1)
                    .replacen(".self_attn.", " ", 1),
                points: s
                    .values
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| (i as f64, v))
                    .collect(),
                band: vec![],
            })
            .collect();
        let title = "Singular values of the base model's weights";
        let axes = Axes {
            title,
            x: "index (descending)",
            y: "singular value (log)",
        };
        add(
            "spectrum".into(),
            "experts",
            title.into(),
            charts::log_lines(&axes, &series),
        );
    }
    for e in &report.experts {
        // Shaded from the expert's smallest change (white) to its largest (red): the changes
        // differ little in size, and where they are largest is the point.
        let changes = e.change.iter().flatten().flatten();
        let (lo, hi) = changes.fold((f64::INFINITY, 0.0f64), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
        let title = format!(
            "Expert `{}`: RMS change of σ's scale ({lo:.4} white … {hi:.4} red)",
            e.expert
        );
        let layers: Vec<String> = e.layers.iter().map(usize::to_string).collect();
        let axes = Axes {
            title: &title,
            x: "matrix",
            y: "layer",
        };
        let svg = charts::heatmap(&axes, &e.modules, &layers, &e.change, lo);
        add(
            format!("scales-{}", e.expert),
            "experts",
            title.clone(),
            svg,
        );
    }
    for m in &report.mixtures {
        let title = format!("`{}`: CEM search on {}", m.adaptation, m.dataset);
        let mut series = vec![
            Series {
                name: "best shot accuracy".into(),
                points: m
                    .generations
                    .iter()
                    .map(|g| (g.generation as f64, g.best_accuracy))
                    .collect(),
                band: vec![],
            },
            Series {
                name: "population mean accuracy".into(),
                points: m
                    .generations
                    .iter()
                    .map(|g| (g.generation as f64, g.mean_accuracy))
                    .collect(),
                band: vec![],
            },
        ];
        for (k, expert) in m.experts.iter().enumerate() {
            series.push(Series {
                name: format!("mean α {expert}"),
                points: m
                    .generations
                    .iter()
                    .filter_map(|g| Some((g.generation as f64, *g.mean_alpha.get(k)?)))
                    .collect(),
                band: vec![],
            });
        }
        let axes = Axes {
            title: &title,
            x: "generation",
            y: "accuracy / α",
        };
        add(
            format!("cem-{}", m.adaptation),
            "adaptation",
            title.clone(),
            charts::lines(&axes, &series),
        );
    }
    (out, problems)
}

type StepValue = fn(&TrainStep) -> Option<f64>;

/// The training charts: id, title, y axis, value per step, spread around it.
const TRAINING_CHARTS: [(&str, &str, &str, StepValue, StepValue); 5] = [
    (
        "reward",
        "Reward per step (mean ± std over rollouts)",
        "reward",
        |s| Some(s.reward),
        |s| Some(s.reward_std),
    ),
    (
        "kl",
        "KL to the base model",
        "KL (nats/token)",
        |s| Some(s.kl),
        |_| None,
    ),
    (
        "val",
        "Validation accuracy",
        "accuracy",
        |s| s.val_accuracy,
        |_| None,
    ),
    (
        "zero-std",
        "Prompts whose rollouts all got the same reward",
        "fraction",
        |s| Some(s.zero_std_fraction),
        |_| None,
    ),
    (
        "throughput",
        "Training throughput",
        "tokens/s",
        |s| Some(s.tokens_per_s),
        |_| None,
    ),
];

/// The filters the templates use, and HTML escaping for `.html` templates.
fn environment() -> Environment<'static> {
    let mut env = crate::jinja::environment();
    env.set_auto_escape_callback(|name| {
        if name.ends_with(".html") {
            AutoEscape::Html
        } else {
            AutoEscape::None
        }
    });
    env.add_filter("pct", |x: f64| format!("{:.1}", 100.0 * x));
    env.add_filter("num", |x: f64, digits: Option<usize>| {
        format!("{x:.*}", digits.unwrap_or(2))
    });
    env.add_filter("pvalue", |p: f64| {
        if p < 0.001 {
            "< 0.001".to_string()
        } else {
            format!("{p:.3}")
        }
    });
    env.add_filter("duration", |s: f64| {
        let s = s.max(0.0);
        match s {
            s if s < 60.0 => format!("{s:.1} s"),
            s if s < 3600.0 => format!("{} min {:.0} s", (s / 60.0).floor(), s % 60.0),
            s => format!(
                "{} h {} min",
                (s / 3600.0).floor(),
                ((s % 3600.0) / 60.0).floor()
            ),
        }
    });
    env.add_filter("utc", |unix: f64| utc(unix));
    env
}

/// A report template: its text, where it came from (for errors) and what it writes.
pub struct Template {
    pub text: String,
    /// The file it was read from, or `built-in`.
    pub origin: String,
    /// `report.md` or `report.html` (HTML templates escape what they insert).
    pub name: &'static str,
}

/// Renders `report` with its charts through `template`.
pub fn render(
    report: &Report,
    charts: &[Chart],
    template: &Template,
) -> Result<String, ReportError> {
    let mut env = environment();
    let fail = |source: minijinja::Error| ReportError::Template {
        origin: template.origin.clone(),
        source,
    };
    env.add_template(template.name, &template.text)
        .map_err(fail)?;
    let ctx = context! {
        report => minijinja::value::Serde(report),
        charts => minijinja::value::Serde(charts),
        tsq => crate::VERSION,
    };
    crate::jinja::render(&env.get_template(template.name).map_err(fail)?, ctx).map_err(fail)
}

/// A Unix time as `YYYY-MM-DD HH:MM UTC` (civil-from-days, no time zone database needed).
fn utc(unix: f64) -> String {
    let secs = unix.max(0.0) as i64;
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rest / 3600,
        (rest % 3600) / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_times_read_as_utc_dates() {
        assert_eq!(utc(0.0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(951_782_400.0), "2000-02-29 00:00 UTC");
        assert_eq!(utc(1_796_210_055.2), "2026-12-02 11:14 UTC");
    }
}
