//! A scenario's run as an SVG chart: workers and rows ready over time, a line per
//! strategy, written by `scaler simulate --svg DIR`.

use std::fmt::Write as _;

use super::{Outcome, Point, Run};

const WIDTH: f64 = 900.0;
const PANEL: f64 = 200.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 45.0;
const TOP: f64 = 80.0;
const GAP: f64 = 50.0;
/// Points per line at most: a long run is thinned, keeping each stretch's highest.
const MOST_POINTS: usize = 600;
/// One colour and dash pattern per strategy, in [`super::strategies::all`]'s order:
/// strategies that behave alike draw the same line, and the dashes keep each visible.
const STYLES: [(&str, &str); 5] = [
    ("#1f77b4", "none"),
    ("#d62728", "none"),
    ("#ff7f0e", "8 4"),
    ("#9467bd", "2 4"),
    ("#2ca02c", "5 5"),
];

/// What a panel draws of each point.
type Measure = fn(&Point) -> u64;

/// The chart of one run.
pub fn svg(run: &Run) -> String {
    let end = run
        .outcomes
        .iter()
        .filter_map(|o| o.series.last())
        .map(|p| p.at)
        .max()
        .unwrap_or(0)
        .max(1);
    let height = TOP + 2.0 * PANEL + GAP + 60.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r##"<rect width="100%" height="100%" fill="white"/><text x="{LEFT}" y="22" font-size="16">{} (seed {})</text><text x="{LEFT}" y="40" fill="#555">{}</text>"##,
        escape(run.scenario.name),
        run.seed,
        escape(run.scenario.about)
    );
    let panels: [(&str, Measure); 2] = [("workers", |p| p.workers), ("rows ready", |p| p.ready)];
    for (n, (label, value)) in panels.into_iter().enumerate() {
        let top = TOP + n as f64 * (PANEL + GAP);
        let most = run
            .outcomes
            .iter()
            .flat_map(|o| &o.series)
            .map(value)
            .max()
            .unwrap_or(0)
            .max(1);
        axes(&mut out, top, label, most, end);
        for (outcome, style) in run.outcomes.iter().zip(STYLES.iter().cycle()) {
            line(&mut out, outcome, value, top, most, end, *style);
        }
    }
    let legend_y = TOP + 2.0 * PANEL + GAP + 45.0;
    for (i, (outcome, (colour, dashes))) in
        run.outcomes.iter().zip(STYLES.iter().cycle()).enumerate()
    {
        let x = LEFT + i as f64 * 150.0;
        let _ = writeln!(
            out,
            r#"<path d="M{x} {} h24" stroke="{colour}" stroke-width="2" stroke-dasharray="{dashes}"/><text x="{}" y="{legend_y}">{}</text>"#,
            legend_y - 4.0,
            x + 30.0,
            escape(&outcome.strategy)
        );
    }
    out.push_str("</svg>\n");
    out
}

fn axes(out: &mut String, top: f64, label: &str, most: u64, end: u64) {
    let bottom = top + PANEL;
    let right = WIDTH - RIGHT;
    let _ = writeln!(
        out,
        r##"<g stroke="#999" fill="none"><path d="M{LEFT} {top} V{bottom} H{right}"/></g><text x="{LEFT}" y="{}" fill="#333">{label}</text>"##,
        top - 8.0
    );
    for step in 0..=2u32 {
        let y = bottom - PANEL * f64::from(step) / 2.0;
        let _ = writeln!(
            out,
            r##"<text x="{}" y="{}" text-anchor="end" fill="#555">{}</text>"##,
            LEFT - 6.0,
            y + 4.0,
            most * u64::from(step) / 2
        );
    }
    for step in 0..=4u32 {
        let x = LEFT + (right - LEFT) * f64::from(step) / 4.0;
        let _ = writeln!(
            out,
            r##"<text x="{x}" y="{}" text-anchor="middle" fill="#555">{} s</text>"##,
            bottom + 16.0,
            end * u64::from(step) / 4
        );
    }
}

fn line(
    out: &mut String,
    outcome: &Outcome,
    value: Measure,
    top: f64,
    most: u64,
    end: u64,
    (colour, dashes): (&str, &str),
) {
    let stride = outcome.series.len().div_ceil(MOST_POINTS).max(1);
    let mut points = String::new();
    for stretch in outcome.series.chunks(stride) {
        let highest = stretch
            .iter()
            .max_by_key(|p| value(p))
            .expect("a chunk is never empty");
        let x = LEFT + (WIDTH - LEFT - RIGHT) * highest.at as f64 / end as f64;
        let y = top + PANEL - PANEL * value(highest) as f64 / most as f64;
        let _ = write!(points, "{x:.1},{y:.1} ");
    }
    let _ = writeln!(
        out,
        r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" stroke-dasharray="{dashes}" points="{}"/>"#,
        points.trim_end()
    );
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
