//! The report's charts, drawn to SVG with plotters: line charts (with a spread band), a
//! log-scale spectrum and a heatmap. Each chart is a fixed-size SVG with a viewBox, so the page
//! scales it to the screen (phone or print) and its text stays legible.

use plotters::chart::MeshStyle;
use plotters::coord::Shift;
use plotters::coord::ranged1d::ValueFormatter;
use plotters::prelude::*;

use super::ReportError;

const SIZE: (u32, u32) = (640, 300);
const FONT: &str = "sans-serif";

/// Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
const COLOURS: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
];

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// One line of a chart, with an optional band (x, low, high) drawn faintly behind it.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub band: Vec<(f64, f64, f64)>,
}

/// The axes of a chart: title, axis descriptions (with units).
pub struct Axes<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
}

/// Values beyond this (or not finite) are not drawn: plotters cannot lay out an axis that spans
/// ±1e308 (it loops), and no metric tsq charts means anything out there.
const MAX_DRAWN: f64 = 1e12;
/// Points drawn per series at most; longer series are thinned evenly (the SVG stays small).
const MAX_POINTS: usize = 2000;

fn drawable(v: f64) -> bool {
    v.is_finite() && v.abs() <= MAX_DRAWN
}

/// The series as drawn: points and band entries with undrawable values dropped, then thinned to
/// [`MAX_POINTS`]; and how many values were dropped, for a note under the chart.
fn drawn(series: &[Series]) -> (Vec<Series>, usize) {
    let mut dropped = 0;
    let drawn = series
        .iter()
        .map(|s| {
            let points: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|p| drawable(p.0) && drawable(p.1))
                .collect();
            let band: Vec<(f64, f64, f64)> = s
                .band
                .iter()
                .copied()
                .filter(|b| drawable(b.0) && drawable(b.1) && drawable(b.2))
                .collect();
            dropped += s.points.len() - points.len() + s.band.len() - band.len();
            Series {
                name: s.name.clone(),
                points: thinned(points),
                band: thinned(band),
            }
        })
        .collect();
    (drawn, dropped)
}

fn thinned<T: Copy>(values: Vec<T>) -> Vec<T> {
    let stride = values.len().div_ceil(MAX_POINTS).max(1);
    if stride == 1 {
        return values;
    }
    values.into_iter().step_by(stride).collect()
}

/// A line under the plot saying how many values were left out, when any were.
fn note_dropped(root: &DrawingArea<SVGBackend, Shift>, dropped: usize) -> Result<(), ReportError> {
    if dropped == 0 {
        return Ok(());
    }
    let text = format!("{dropped} values not drawn (not finite, or beyond ±{MAX_DRAWN:e})");
    root.draw(&Text::new(text, (8, SIZE.1 as i32 - 16), (FONT, 13)))
        .map_err(fail)
}

fn fail(e: impl std::fmt::Display) -> ReportError {
    ReportError::Chart(e.to_string())
}

/// Draws into an SVG string with `draw`, labelled `title` for screen readers (plotters writes
/// a viewBox, so the page can scale it).
fn svg(
    title: &str,
    draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> Result<(), ReportError>,
) -> Result<String, ReportError> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(fail)?;
        draw(&root)?;
        root.present().map_err(fail)?;
    }
    let label = title
        .replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;");
    Ok(out.replacen(
        "<svg ",
        &format!("<svg role=\"img\" aria-label=\"{label}\" "),
        1,
    ))
}

/// A chart's frame: its caption and the room for axis labels, the same on every chart.
fn frame<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
    title: &str,
) -> ChartBuilder<'a, 'b, SVGBackend<'b>> {
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(title, (FONT, 21))
        .margin(12)
        .x_label_area_size(52)
        .y_label_area_size(76);
    builder
}

/// The axes' descriptions and text sizes, the same on every chart.
fn described<X, Y, XT, YT, DB>(mesh: &mut MeshStyle<'_, '_, X, Y, DB>, axes: &Axes)
where
    X: Ranged<ValueType = XT> + ValueFormatter<XT>,
    Y: Ranged<ValueType = YT> + ValueFormatter<YT>,
    DB: DrawingBackend,
{
    mesh.x_desc(axes.x)
        .y_desc(axes.y)
        .label_style((FONT, 17))
        .axis_desc_style((FONT, 17));
}

/// The legend of the series drawn with a label, in the upper right corner.
fn legend<'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
) -> Result<(), ReportError> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(fail)
}

/// A legend entry's line in `c`.
fn marker(c: RGBColor) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
}

/// An axis label: whole numbers without decimals, others with up to three significant decimals.
fn tick(v: &f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round())
    } else {
        let text = format!("{v:.3}");
        text.trim_end_matches('0').to_string()
    }
}

/// The range a set of values spans, padded a little (and never empty).
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    // A flat series still gets a readable axis around its value.
    let pad = ((hi - lo) * 0.05).max(hi.abs().max(1.0) * 0.05);
    (lo - pad, hi + pad)
}

/// Lines over a shared x axis, each with its band; a legend when there is more than one.
pub fn lines(axes: &Axes, series: &[Series]) -> Result<String, ReportError> {
    let (series, dropped) = drawn(series);
    let series = series.as_slice();
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = series.iter().flat_map(|s| {
        s.points
            .iter()
            .map(|p| p.1)
            .chain(s.band.iter().flat_map(|b| [b.1, b.2]))
    });
    let ((x0, x1), (y0, y1)) = (span(xs), span(ys));
    svg(axes.title, |root| {
        let mut chart = frame(root, axes.title)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(fail)?;
        let mut mesh = chart.configure_mesh();
        described(&mut mesh, axes);
        mesh.light_line_style(WHITE.mix(0.0))
            .x_label_formatter(&tick)
            .y_label_formatter(&tick)
            .draw()
            .map_err(fail)?;
        for (i, s) in series.iter().enumerate() {
            let c = colour(i);
            if !s.band.is_empty() {
                let outline: Vec<(f64, f64)> = s
                    .band
                    .iter()
                    .map(|b| (b.0, b.2))
                    .chain(s.band.iter().rev().map(|b| (b.0, b.1)))
                    .collect();
                chart
                    .draw_series(std::iter::once(Polygon::new(outline, c.mix(0.15))))
                    .map_err(fail)?;
            }
            let line = chart
                .draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2)))
                .map_err(fail)?;
            if series.len() > 1 {
                line.label(s.name.as_str()).legend(marker(c));
            }
        }
        if series.len() > 1 {
            legend(&mut chart)?;
        }
        note_dropped(root, dropped)
    })
}

/// Positive values per index on a log-scale y axis (singular value spectra).
pub fn log_lines(axes: &Axes, series: &[Series]) -> Result<String, ReportError> {
    let (series, dropped) = drawn(series);
    let series = series.as_slice();
    let positive = |v: &f64| *v > 0.0;
    let x1 = series.iter().map(|s| s.points.len()).max().unwrap_or(1) as f64;
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1).filter(positive))
        .collect();
    let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() {
        (lo * 0.8, hi * 1.25)
    } else {
        (0.1, 1.0)
    };
    svg(axes.title, |root| {
        let mut chart = frame(root, axes.title)
            .build_cartesian_2d(0f64..x1, (lo..hi).log_scale())
            .map_err(fail)?;
        let mut mesh = chart.configure_mesh();
        described(&mut mesh, axes);
        mesh.light_line_style(WHITE.mix(0.0))
            .x_label_formatter(&tick)
            .draw()
            .map_err(fail)?;
        for (i, s) in series.iter().enumerate() {
            let c = colour(i);
            let points = s.points.iter().copied().filter(|p| positive(&p.1));
            chart
                .draw_series(LineSeries::new(points, c.stroke_width(2)))
                .map_err(fail)?
                .label(s.name.as_str())
                .legend(marker(c));
        }
        legend(&mut chart)?;
        note_dropped(root, dropped)
    })
}

/// A grid of values around `centre`: cells above it shade red, below it blue, white at it;
/// missing cells grey. `columns` label x, `rows` label y (bottom to top).
pub fn heatmap(
    axes: &Axes,
    columns: &[String],
    rows: &[String],
    values: &[Vec<Option<f64>>],
    centre: f64,
) -> Result<String, ReportError> {
    let reach = values
        .iter()
        .flatten()
        .flatten()
        .filter(|v| drawable(**v))
        .map(|v| (v - centre).abs())
        .fold(1e-9, f64::max);
    let shade = |v: f64| {
        let t = ((v - centre) / reach).clamp(-1.0, 1.0);
        let towards = |c: u8| (255.0 - (255.0 - f64::from(c)) * t.abs()).round() as u8;
        if t >= 0.0 {
            RGBColor(towards(178), towards(24), towards(43))
        } else {
            RGBColor(towards(33), towards(102), towards(172))
        }
    };
    let (nx, ny) = (columns.len().max(1), rows.len().max(1));
    // At most ~15 row labels, so they stay legible.
    let every = ny.div_ceil(15);
    svg(axes.title, |root| {
        let mut chart = frame(root, axes.title)
            .build_cartesian_2d((0..nx - 1).into_segmented(), (0..ny - 1).into_segmented())
            .map_err(fail)?;
        let label = |names: &[String], v: &SegmentValue<usize>, every: usize| match v {
            SegmentValue::CenterOf(i) if i % every == 0 => {
                names.get(*i).cloned().unwrap_or_default()
            }
            _ => String::new(),
        };
        let mut mesh = chart.configure_mesh();
        described(&mut mesh, axes);
        mesh.disable_mesh()
            .label_style((FONT, 16))
            .x_labels(nx)
            .y_labels(ny)
            .x_label_formatter(&|v| label(columns, v, 1))
            .y_label_formatter(&|v| label(rows, v, every))
            .draw()
            .map_err(fail)?;
        let cells = values.iter().enumerate().flat_map(|(y, row)| {
            row.iter().enumerate().map(move |(x, v)| {
                let fill = v
                    .filter(|v| drawable(*v))
                    .map_or(RGBColor(200, 200, 200), shade);
                Rectangle::new(
                    [
                        (SegmentValue::Exact(x), SegmentValue::Exact(y)),
                        (SegmentValue::Exact(x + 1), SegmentValue::Exact(y + 1)),
                    ],
                    fill.filled(),
                )
            })
        });
        chart.draw_series(cells).map_err(fail)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ±1e308 made plotters loop, NaN and a million points made no sense or a huge file.
    #[test]
    fn extreme_and_endless_values_are_left_out_and_said() {
        let mut points: Vec<(f64, f64)> = (0..1_000_000).map(|i| (i as f64, 0.5)).collect();
        points.extend([(1.0, 1e308), (2.0, -1e308), (3.0, f64::NAN), (4.0, 1e-300)]);
        let series = [Series {
            name: "reward".into(),
            points,
            band: vec![(0.0, -f64::INFINITY, 1.0)],
        }];
        let axes = Axes {
            title: "t",
            x: "x",
            y: "y",
        };
        for svg in [lines(&axes, &series), log_lines(&axes, &series)] {
            let svg = svg.unwrap();
            assert!(svg.contains("4 values not drawn"), "{}", &svg[..200]);
            assert!(svg.len() < 1 << 20, "{} bytes", svg.len());
        }
    }
}
