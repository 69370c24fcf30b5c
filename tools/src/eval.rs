//! `outpostctl eval`: the labelled held-out set through a running edge and its central, with a
//! sweep of escalation policies and thresholds, as a table and an SVG plot of accuracy against
//! the fraction escalated.
//!
//! Every figure comes from real requests: each row is sent one at a time to the edge with the
//! policy and threshold as request parameters, so the edge decides, calls the central when it is
//! unsure, and says in `parameters.served_by` who answered. Bytes sent upstream are read from the
//! edge's `outpost_central_bytes_sent_total` before and after each point.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::{Value, json};

use crate::http::Conn;
use crate::v2client;

/// Thresholds tried for every policy unless given.
pub const DEFAULT_THRESHOLDS: [f64; 9] = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999];
/// The policies the edge knows.
pub const POLICIES: [&str; 3] = ["max_probability", "margin", "entropy"];

/// One labelled row.
pub struct Row {
    pub label: usize,
    pub values: Vec<f32>,
}

/// Reads `label,v0,v1,..` rows after a header line (the digits' 64 pixels, magika's 2,048 bytes).
pub fn read_rows(path: &Path, limit: Option<usize>) -> anyhow::Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let mut fields = line.split(',');
        let label = fields.next().and_then(|f| f.parse().ok()).with_context(|| format!("line {}: no label", i + 1))?;
        let values = fields
            .map(|f| f.parse::<f32>())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("line {}", i + 1))?;
        rows.push(Row { label, values });
        if limit.is_some_and(|l| rows.len() >= l) {
            break;
        }
    }
    if rows.is_empty() {
        bail!("{}: no rows", path.display());
    }
    Ok(rows)
}

/// One point of the sweep (or a baseline).
#[derive(Clone, Debug)]
pub struct Point {
    pub name: String,
    pub policy: Option<&'static str>,
    pub threshold: Option<f64>,
    pub accuracy: f64,
    pub escalated: f64,
    pub bytes_up: u64,
    pub mean: Duration,
    pub p99: Duration,
}

/// Where to send requests, and the models' input.
pub struct Target {
    pub edge: SocketAddr,
    pub model: String,
    pub central: SocketAddr,
    pub central_model: String,
    /// The input's name, and its datatype: `FP32`, or `INT32` (the row's values are integers).
    pub input: String,
    pub datatype: Datatype,
}

/// The input datatypes a row can be sent as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Datatype {
    #[value(name = "FP32")]
    Fp32,
    #[value(name = "INT32")]
    Int32,
}

impl Target {
    /// The row as a V2 JSON input tensor `[1, len]`.
    fn input(&self, row: &Row) -> Value {
        let shape = [1, row.values.len()];
        match self.datatype {
            Datatype::Fp32 => json!({"name": self.input, "shape": shape, "datatype": "FP32", "data": row.values}),
            Datatype::Int32 => {
                let data: Vec<i32> = row.values.iter().map(|&v| v as i32).collect();
                json!({"name": self.input, "shape": shape, "datatype": "INT32", "data": data})
            }
        }
    }
}

fn argmax(t: &outpost_runtime::tensor::Tensor) -> usize {
    let v = t.to_f64();
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap_or(0)
}

async fn run_point(
    conn: &mut Conn,
    path: &str,
    target: &Target,
    rows: &[Row],
    params: Value,
    metrics: Option<&mut Conn>,
) -> anyhow::Result<(f64, f64, u64, Duration, Duration)> {
    let mut metrics = metrics;
    let bytes_before = match metrics.as_deref_mut() {
        Some(m) => bytes_sent(m).await?,
        None => 0,
    };
    let (mut correct, mut escalated) = (0usize, 0usize);
    let mut latencies = Vec::with_capacity(rows.len());
    for row in rows {
        let body = json!({"inputs": [target.input(row)], "parameters": params});
        let t = Instant::now();
        let r = conn.post_json(path, &body).await?;
        latencies.push(t.elapsed());
        if r.status != 200 {
            bail!("{path} answered {}: {}", r.status, r.error());
        }
        let outputs = v2client::outputs(&r).map_err(anyhow::Error::msg)?;
        let probs = outputs.first().context("no output")?;
        correct += (argmax(probs) == row.label) as usize;
        escalated += (r.json()["parameters"]["served_by"] == "central") as usize;
    }
    let bytes_after = match metrics {
        Some(m) => bytes_sent(m).await?,
        None => 0,
    };
    latencies.sort_unstable();
    let n = rows.len() as f64;
    let mean = latencies.iter().sum::<Duration>() / latencies.len() as u32;
    let p99 = latencies[((latencies.len() as f64 * 0.99).ceil() as usize).clamp(1, latencies.len()) - 1];
    Ok((correct as f64 / n, escalated as f64 / n, bytes_after.saturating_sub(bytes_before), mean, p99))
}

async fn bytes_sent(conn: &mut Conn) -> anyhow::Result<u64> {
    let text = String::from_utf8(conn.get("/metrics").await?.body.to_vec())?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("outpost_central_bytes_sent_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum())
}

/// Runs the sweep: edge-only, central-only, then every policy at every threshold.
pub async fn sweep(target: &Target, rows: &[Row], thresholds: &[f64]) -> anyhow::Result<Vec<Point>> {
    let mut edge =
        Conn::connect(target.edge).await.with_context(|| format!("connecting to the edge at {}", target.edge))?;
    let mut edge_metrics = Conn::connect(target.edge).await?;
    let mut central = Conn::connect(target.central)
        .await
        .with_context(|| format!("connecting to the central at {}", target.central))?;
    let edge_path = format!("/v2/models/{}/infer", target.model);
    let central_path = format!("/v2/models/{}/infer", target.central_model);
    let mut points = Vec::new();
    let (acc, esc, _, mean, p99) =
        run_point(&mut edge, &edge_path, target, rows, json!({"escalation": "local"}), None).await?;
    points.push(Point {
        name: "edge only".into(),
        policy: None,
        threshold: None,
        accuracy: acc,
        escalated: esc,
        bytes_up: 0,
        mean,
        p99,
    });
    let (acc, _, _, mean, p99) = run_point(&mut central, &central_path, target, rows, json!({}), None).await?;
    // What the edge sends upstream per escalated row: the input as a binary tensor (both
    // datatypes take four bytes an element).
    let per_row = v2client::binary_request(&[outpost_runtime::tensor::Tensor::from_f32(
        &target.input,
        vec![1, rows[0].values.len()],
        &rows[0].values,
    )])
    .bytes
    .len();
    points.push(Point {
        name: "central only".into(),
        policy: None,
        threshold: None,
        accuracy: acc,
        escalated: 1.0,
        bytes_up: (per_row * rows.len()) as u64,
        mean,
        p99,
    });
    for policy in POLICIES {
        for &t in thresholds {
            let params = json!({"escalation_policy": policy, "escalation_threshold": t});
            let (acc, esc, bytes, mean, p99) =
                run_point(&mut edge, &edge_path, target, rows, params, Some(&mut edge_metrics)).await?;
            points.push(Point {
                name: "cascade".into(),
                policy: Some(policy),
                threshold: Some(t),
                accuracy: acc,
                escalated: esc,
                bytes_up: bytes,
                mean,
                p99,
            });
        }
    }
    Ok(points)
}

/// The cascade point that escalates least while staying within `within` (e.g. 0.005) of the
/// central-only accuracy.
pub fn best(points: &[Point], within: f64) -> Option<&Point> {
    let central = points.iter().find(|p| p.name == "central only")?.accuracy;
    points
        .iter()
        .filter(|p| p.policy.is_some() && p.accuracy >= central - within - 1e-12)
        .min_by(|a, b| a.escalated.total_cmp(&b.escalated).then(b.accuracy.total_cmp(&a.accuracy)))
}

/// The table as Markdown.
pub fn table(points: &[Point]) -> String {
    let mut s = String::from(
        "| what | policy | threshold | accuracy | escalated | bytes up | mean latency | p99 latency |\n|---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for p in points {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2}% | {:.1}% | {} | {:.0} µs | {:.0} µs |",
            p.name,
            p.policy.unwrap_or("-"),
            p.threshold.map_or("-".into(), |t| t.to_string()),
            p.accuracy * 100.0,
            p.escalated * 100.0,
            p.bytes_up,
            p.mean.as_secs_f64() * 1e6,
            p.p99.as_secs_f64() * 1e6
        );
    }
    s
}

/// An SVG line chart: accuracy against the fraction escalated, one line per policy, and the
/// edge-only and central-only accuracies as dashed lines (plotters' SVG backend: text is left
/// to the viewer's fonts, so no font is needed here).
pub fn plot(points: &[Point]) -> String {
    let lowest = points.iter().map(|p| p.accuracy).fold(1.0, f64::min);
    let y_min = ((lowest * 100.0).floor() - 1.0).max(0.0) / 100.0;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (720, 440)).into_drawing_area();
        // Drawing into a string has no I/O to fail; an error is a bug in the chart itself.
        draw(&root, points, y_min).expect("the chart draws into a string");
    }
    svg
}

type Drawn<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, points: &[Point], y_min: f64) -> Drawn<DB> {
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(root)
        .caption("Cascade accuracy vs fraction escalated", ("sans-serif", 14))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..1f64, y_min..1f64)?;
    chart
        .configure_mesh()
        .x_desc("fraction of requests escalated")
        .y_desc("accuracy")
        .x_label_formatter(&|f| format!("{:.0}%", f * 100.0))
        .y_label_formatter(&|a| format!("{:.0}%", a * 100.0))
        .light_line_style(RGBColor(0xee, 0xee, 0xee))
        .draw()?;
    let colors = [RGBColor(0x1f, 0x77, 0xb4), RGBColor(0xd6, 0x27, 0x28), RGBColor(0x2c, 0xa0, 0x2c)];
    for (policy, color) in POLICIES.iter().zip(colors) {
        let mut line: Vec<(f64, f64)> =
            points.iter().filter(|p| p.policy == Some(policy)).map(|p| (p.escalated, p.accuracy)).collect();
        line.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)).point_size(3))?
            .label(*policy)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    let grey = RGBColor(0x55, 0x55, 0x55);
    for (name, dash) in [("edge only", 6), ("central only", 2)] {
        if let Some(p) = points.iter().find(|p| p.name == name) {
            let level = vec![(0.0, p.accuracy), (1.0, p.accuracy)];
            chart
                .draw_series(DashedLineSeries::new(level, dash, 4, grey.into()))?
                .label(format!("{name} {:.2}%", p.accuracy * 100.0))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(grey)
        .draw()?;
    root.present()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(policy: Option<&'static str>, name: &str, accuracy: f64, escalated: f64) -> Point {
        Point {
            name: name.into(),
            policy,
            threshold: Some(0.9),
            accuracy,
            escalated,
            bytes_up: 0,
            mean: Duration::ZERO,
            p99: Duration::ZERO,
        }
    }

    #[test]
    fn the_best_point_escalates_least_within_the_margin() {
        let points = vec![
            point(None, "central only", 0.98, 1.0),
            point(Some("margin"), "cascade", 0.970, 0.05),
            point(Some("margin"), "cascade", 0.976, 0.12),
            point(Some("entropy"), "cascade", 0.979, 0.30),
        ];
        let b = best(&points, 0.005).unwrap();
        assert_eq!((b.accuracy, b.escalated), (0.976, 0.12));
        assert!(best(&points, 0.0).is_none());
    }

    #[test]
    fn rows_are_sent_as_the_named_input_in_its_datatype() {
        let target = |datatype| Target {
            edge: "127.0.0.1:1".parse().unwrap(),
            model: "m".into(),
            central: "127.0.0.1:2".parse().unwrap(),
            central_model: "c".into(),
            input: "bytes".into(),
            datatype,
        };
        let row = Row { label: 0, values: vec![1.0, 256.0, 0.5] };
        assert_eq!(
            target(Datatype::Int32).input(&row),
            json!({"name": "bytes", "shape": [1, 3], "datatype": "INT32", "data": [1, 256, 0]})
        );
        assert_eq!(
            target(Datatype::Fp32).input(&row),
            json!({"name": "bytes", "shape": [1, 3], "datatype": "FP32", "data": [1.0, 256.0, 0.5]})
        );
    }

    #[test]
    fn the_plot_is_an_svg_with_a_line_per_policy() {
        let points = vec![
            point(None, "edge only", 0.96, 0.0),
            point(None, "central only", 0.98, 1.0),
            point(Some("margin"), "cascade", 0.97, 0.1),
        ];
        let svg = plot(&points);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // A line for the policy with points, a legend line for each policy, and the two levels.
        assert!(svg.matches("<polyline").count() >= 1 + POLICIES.len() + 2, "{svg}");
        for policy in POLICIES {
            assert!(svg.contains(&format!("\n{policy}\n")), "the legend names {policy}: {svg}");
        }
        assert!(svg.contains("central only 98.00%"));
    }
}
