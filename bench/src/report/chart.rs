//! `throughput.svg`: requests/s, p99 latency and the server's CPU per
//! request against connections (log scale), one line per target through
//! its median rounds, with a whisker over each point from its lowest round
//! to its highest; the legend beside the panels, never over a point; and
//! below them the host and the command line that made it.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{Report, Row, host, transport};

/// The picture's width, and the panels' share of it: the legend takes the
/// rest, to their right.
const WIDTH: u32 = 1000;
const PLOTS_WIDTH: u32 = 790;
const TITLE_HEIGHT: u32 = 44;
const PANEL_HEIGHT: u32 = 320;
/// Each line of the caption below the panels.
const CAPTION_LINE: u32 = 20;
/// The longest caption line, in characters, before the command line is
/// wrapped onto the next.
const CAPTION_WIDTH: usize = 160;

/// Colours told apart on a projector and in print (Tableau's palette).
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
];

/// One of the panels: what it plots of a row, and how its axis reads.
struct Panel {
    title: &'static str,
    y_desc: &'static str,
    value: fn(&Row) -> Option<f64>,
    y_format: fn(&f64) -> String,
}

fn panels() -> [Panel; 3] {
    [
        Panel {
            title: "throughput",
            y_desc: "requests/s",
            value: |row| Some(row.requests_per_second),
            y_format: |v| format!("{:.0}k", v / 1000.0),
        },
        Panel {
            title: "p99 latency",
            y_desc: "p99 (ms)",
            value: |row| Some(row.p99_us as f64 / 1000.0),
            y_format: |v| format!("{v:.1}"),
        },
        Panel {
            title: "server CPU per request (user + system)",
            y_desc: "CPU/request (µs)",
            value: Row::server_us_per_request,
            y_format: |v| format!("{v:.1}"),
        },
    ]
}

/// Writes the chart of `report` to `path`; `command` is how the bench
/// was run, for the caption.
pub fn write_svg(report: &Report, command: &str, path: &Path) -> Result<(), String> {
    let caption = caption(report, command);
    let root = SVGBackend::new(path, size(&caption)).into_drawing_area();
    draw(&root, report, &caption).map_err(|e| format!("{}: {e}", path.display()))
}

fn size(caption: &[String]) -> (u32, u32) {
    let caption_height = CAPTION_LINE * (caption.len() as u32 + 1);
    (WIDTH, TITLE_HEIGHT + 3 * PANEL_HEIGHT + caption_height)
}

/// The lines below the panels: where it ran, how it was run, and how to
/// read a point and its whisker.
fn caption(report: &Report, command: &str) -> Vec<String> {
    let mut lines = vec![host(report)];
    let mut line = "command:".to_owned();
    let mut words_on_line = 0;
    for word in command.split(' ') {
        // A word longer than a line has one of its own.
        if words_on_line > 0 && line.len() + 1 + word.len() > CAPTION_WIDTH {
            lines.push(std::mem::replace(&mut line, "   ".to_owned()));
            words_on_line = 0;
        }
        line.push(' ');
        line.push_str(word);
        words_on_line += 1;
    }
    lines.push(line);
    if report.rounds > 1 {
        lines.push(format!(
            "each point: the median of {} rounds (by {}); its whisker: the lowest to the highest round",
            report.rounds,
            if report.rate.is_some() {
                "p99"
            } else {
                "requests/s"
            }
        ));
    }
    lines
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    report: &Report,
    caption: &[String],
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (title, rest) = root.split_vertically(TITLE_HEIGHT);
    let (body, below) = rest.split_vertically(3 * PANEL_HEIGHT);
    let (plots, legend) = body.split_horizontally(PLOTS_WIDTH);
    let heading = format!(
        "gateway throughput{}",
        transport(report)
            .map(|t| format!(": {t}"))
            .unwrap_or_default()
    );
    title.draw_text(
        &heading,
        &("sans-serif", 22).into_font().color(&BLACK),
        (16, 12),
    )?;
    let targets = targets(report);
    let x_range = x_range(report);
    for (area, panel) in plots.split_evenly((3, 1)).iter().zip(panels()) {
        draw_panel(area, report, &targets, &panel, x_range)?;
    }
    draw_legend(&legend, &targets)?;
    let text = ("sans-serif", 13).into_font().color(&BLACK);
    for (i, line) in caption.iter().enumerate() {
        below.draw_text(line, &text, (16, 8 + CAPTION_LINE as i32 * i as i32))?;
    }
    root.present()?;
    Ok(())
}

/// The targets, in the order first measured: each keeps its colour in
/// every panel.
fn targets(report: &Report) -> Vec<&str> {
    let mut targets: Vec<&str> = Vec::new();
    for row in &report.rows {
        if !targets.contains(&row.target.as_str()) {
            targets.push(&row.target);
        }
    }
    targets
}

/// The connections' axis, a little wider than the levels measured so
/// that the outermost points and their whiskers are drawn whole.
fn x_range(report: &Report) -> (f64, f64) {
    let connections = report.rows.iter().map(|r| r.connections as f64);
    let min_c = connections.clone().fold(f64::INFINITY, f64::min);
    let max_c = connections.fold(1.0, f64::max);
    if min_c >= max_c {
        (max_c / 2.0, max_c * 2.0)
    } else {
        (min_c / 1.25, max_c * 1.25)
    }
}

/// The concurrency levels measured, where the connections' axis is
/// labelled.
fn levels(report: &Report) -> Vec<f64> {
    let mut levels: Vec<f64> = Vec::new();
    for row in &report.rows {
        let level = row.connections as f64;
        if !levels.contains(&level) {
            levels.push(level);
        }
    }
    levels.sort_by(f64::total_cmp);
    levels
}

/// A target's median round at one concurrency level, with its lowest and
/// highest round, in one panel's measure.
#[derive(Debug, PartialEq)]
struct Point<'a> {
    target: &'a str,
    connections: f64,
    median: f64,
    lowest: f64,
    highest: f64,
    rounds: usize,
}

impl Point<'_> {
    /// The whisker over the point: from its lowest round to its highest,
    /// where there was more than one.
    fn whisker(&self) -> Option<(f64, f64)> {
        (self.rounds > 1).then_some((self.lowest, self.highest))
    }
}

/// Every target's points in one panel's measure (`value`), where the
/// median round has one.
fn points(report: &Report, value: fn(&Row) -> Option<f64>) -> Vec<Point<'_>> {
    report
        .summaries()
        .into_iter()
        .filter_map(|summary| {
            let median = summary.median;
            let rounds: Vec<f64> = report
                .rows
                .iter()
                .filter(|r| r.target == median.target && r.connections == median.connections)
                .filter_map(value)
                .collect();
            Some(Point {
                target: &median.target,
                connections: median.connections as f64,
                median: value(median)?,
                lowest: rounds.iter().copied().fold(f64::INFINITY, f64::min),
                highest: rounds.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                rounds: rounds.len(),
            })
        })
        .collect()
}

/// One panel: `panel`'s measure of each target's points against
/// connections (log scale), a line through each target's medians.
fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    report: &Report,
    targets: &[&str],
    panel: &Panel,
    (min_c, max_c): (f64, f64),
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let points = points(report, panel.value);
    let y_max = points
        .iter()
        .map(|p| p.highest.max(p.median))
        .fold(0.001, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (min_c..max_c).log_scale().with_key_points(levels(report)),
            0.0..y_max,
        )?;
    chart
        .configure_mesh()
        .x_desc("connections")
        .y_desc(panel.y_desc)
        .light_line_style(TRANSPARENT)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 15))
        .x_label_formatter(&|c| format!("{c:.0}"))
        .y_label_formatter(&panel.y_format)
        .draw()?;
    if points.is_empty() {
        // No server process to read (`--target`): said, not left blank.
        let (x, y) = area.get_pixel_range();
        let middle = ((x.start + x.end) / 2, (y.start + y.end) / 2);
        let style = ("sans-serif", 14)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Center));
        area.draw_text("not measured", &style, middle)?;
    }
    for (i, target) in targets.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let mine: Vec<&Point> = points.iter().filter(|p| p.target == *target).collect();
        chart.draw_series(LineSeries::new(
            mine.iter().map(|p| (p.connections, p.median)),
            color.stroke_width(2),
        ))?;
        chart.draw_series(mine.iter().flat_map(|p| whisker_paths(p, color)))?;
        chart.draw_series(
            mine.iter()
                .map(|p| Circle::new((p.connections, p.median), 4, color.filled())),
        )?;
    }
    Ok(())
}

/// A whisker's stem and its two caps, as wide on the log scale at every
/// level; nothing for a point of one round.
fn whisker_paths(point: &Point, color: RGBColor) -> Vec<PathElement<(f64, f64)>> {
    const CAP: f64 = 1.06;
    let Some((lowest, highest)) = point.whisker() else {
        return Vec::new();
    };
    let x = point.connections;
    let style = color.stroke_width(1);
    vec![
        PathElement::new(vec![(x, lowest), (x, highest)], style),
        PathElement::new(vec![(x / CAP, lowest), (x * CAP, lowest)], style),
        PathElement::new(vec![(x / CAP, highest), (x * CAP, highest)], style),
    ]
}

/// The legend, in its own column beside the panels: each target's line
/// and point, and its name.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    targets: &[&str],
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let name = ("sans-serif", 17)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    for (i, target) in targets.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let y = 48 + 26 * i as i32;
        area.draw(&PathElement::new(
            vec![(8, y), (40, y)],
            color.stroke_width(2),
        ))?;
        area.draw(&Circle::new((24, y), 4, color.filled()))?;
        area.draw_text(target, &name, (50, y))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{EIGHT, report};
    use super::*;

    /// tokio at 16 and 1,024 connections in three rounds, nginx in one.
    fn measured() -> Report {
        let mut report = report(EIGHT, 19.2, 4.0, 12.0);
        report.cpu_model = "Test CPU 9000".to_owned();
        report.rounds = 3;
        let first = report.rows[0].clone();
        let mut rows = Vec::new();
        for connections in [16, 1024] {
            for (round, requests_per_second) in [(1, 90_000.0), (2, 100_000.0), (3, 120_000.0)] {
                rows.push(Row {
                    connections,
                    requests_per_second,
                    round,
                    ..first.clone()
                });
            }
            rows.push(Row {
                target: "nginx".to_owned(),
                connections,
                requests_per_second: 80_000.0,
                ..first.clone()
            });
        }
        report.rows = rows;
        report
    }

    fn svg(report: &Report, command: &str) -> String {
        let caption = caption(report, command);
        let mut text = String::new();
        {
            let root = SVGBackend::with_string(&mut text, size(&caption)).into_drawing_area();
            draw(&root, report, &caption).unwrap();
        }
        text
    }

    /// The value of `name="..."` in an SVG element's text.
    fn attribute(element: &str, name: &str) -> Option<f64> {
        let start = element.find(&format!(" {name}=\""))? + name.len() + 3;
        let end = start + element[start..].find('"')?;
        element[start..end].parse().ok()
    }

    /// The `x` of each `<text>` that reads `content`.
    fn texts_at(svg: &str, content: &str) -> Vec<f64> {
        svg.split("<text")
            .skip(1)
            .filter(|element| {
                element
                    .split_once('>')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with(&format!("{content}\n")))
            })
            .filter_map(|element| attribute(element, "x"))
            .collect()
    }

    #[test]
    fn the_legend_lies_beside_the_panels_not_over_them() {
        let svg = svg(&measured(), "bench");
        for target in ["tokio", "nginx"] {
            let at = texts_at(&svg, target);
            assert_eq!(at.len(), 1, "{target}: {at:?}");
            assert!(at[0] >= f64::from(PLOTS_WIDTH), "{target} at {at:?}");
        }
        // The points at 1,024 connections are drawn, inside the panels.
        let points: Vec<f64> = svg
            .split("<circle")
            .skip(1)
            .filter_map(|element| attribute(element, "cx"))
            .filter(|&x| x < f64::from(PLOTS_WIDTH))
            .collect();
        assert_eq!(points.len(), 2 * 2 * 3, "{points:?}");
    }

    #[test]
    fn a_point_of_three_rounds_gets_a_whisker_from_its_lowest_to_its_highest() {
        let report = measured();
        let throughput = panels()[0].value;
        let points = points(&report, throughput);
        let tokio: Vec<_> = points.iter().filter(|p| p.target == "tokio").collect();
        assert_eq!(tokio.len(), 2);
        for point in tokio {
            assert_eq!(point.median, 100_000.0);
            assert_eq!(point.rounds, 3);
            assert_eq!(point.whisker(), Some((90_000.0, 120_000.0)));
            assert_eq!(whisker_paths(point, PALETTE[0]).len(), 3);
        }
        let nginx = points.iter().find(|p| p.target == "nginx").unwrap();
        assert_eq!(nginx.whisker(), None);
        assert!(whisker_paths(nginx, PALETTE[1]).is_empty());
    }

    #[test]
    fn cpu_per_request_is_the_third_panel() {
        let report = measured();
        let cpu = &panels()[2];
        let points = points(&report, cpu.value);
        assert_eq!(points.len(), 4);
        assert!(points.iter().all(|p| p.median == 19.2), "{points:?}");
        assert_eq!(texts_at(&svg(&report, "bench"), cpu.title).len(), 1);
    }

    #[test]
    fn the_caption_names_the_host_and_the_command() {
        let command = "bench --rounds 3 --connections 16,1024 --out /tmp/bench";
        let svg = svg(&measured(), command);
        assert!(svg.contains("host: Test CPU 9000 (16 CPUs); gateway/nginx on CPUs 0-7"));
        assert!(svg.contains(&format!("command: {command}")), "{svg}");
        assert!(svg.contains("the median of 3 rounds"));
        // A long command line is wrapped, not cut.
        let long = format!("bench{}", " --backends tokio".repeat(12));
        let lines = caption(&measured(), &long);
        assert!(lines.iter().all(|l| l.len() <= CAPTION_WIDTH), "{lines:?}");
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(
            [lines[1].trim(), lines[2].trim()].join(" "),
            format!("command: {long}")
        );
    }

    /// `--target`: one level, and no server process whose CPU is read.
    #[test]
    fn one_level_without_cpu_figures_is_drawn_and_says_so() {
        let mut report = report(EIGHT, 19.2, 4.0, 12.0);
        report.rows[0].target = "target".to_owned();
        report.rows[0].cpu.server_s = None;
        let svg = svg(&report, "bench --target 127.0.0.1:8080");
        assert_eq!(texts_at(&svg, "not measured").len(), 1);
        assert!(svg.contains("host: test (16 CPUs); load on CPUs 10-15"));
    }
}
