//! PNG line charts of training curves, drawn without any system font: a built-in 5×7 bitmap
//! font covers digits, lowercase letters and a little punctuation.

use std::path::Path;

use crate::error::{ErrorSource, RefaError, Result};
use crate::train::StepMetrics;

/// One line (optionally with point markers) of a panel.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// `(x, y)` points; non-finite ones are skipped.
    pub points: Vec<(f64, f64)>,
    /// RGB color.
    pub color: [u8; 3],
    /// Draw a marker at each point (for sparse series such as evaluations).
    pub markers: bool,
}

/// One chart: a title, an x-axis name, and its series.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// Title above the chart.
    pub title: String,
    /// Name of the x axis.
    pub x_label: String,
    /// The lines.
    pub series: Vec<Series>,
}

const PANEL_WIDTH: usize = 460;
const PANEL_HEIGHT: usize = 320;
const LEFT: usize = 78;
const RIGHT: usize = 16;
const TOP: usize = 54;
const BOTTOM: usize = 40;
const TRAIN_COLOR: [u8; 3] = [31, 119, 180];
const EVAL_COLOR: [u8; 3] = [214, 39, 40];

/// Loss, margin, positive mass and EOS probability against the step, training and
/// evaluation, as a 2 × 2 PNG.
pub fn plot_history(
    history: &[StepMetrics],
    evaluations: &[StepMetrics],
    path: impl AsRef<Path>,
) -> Result<()> {
    const CHARTS: [&str; 4] = [
        "loss",
        "rewards/margins",
        "rewards/positive_mass",
        "eos/prob",
    ];
    let charts: Vec<_> = StepMetrics::LOSS_METRICS
        .iter()
        .filter(|m| CHARTS.contains(&m.key))
        .collect();
    let panels: Vec<Panel> = charts
        .iter()
        .map(|metric| {
            let points = |ms: &[StepMetrics]| {
                ms.iter()
                    .map(|m| (m.step as f64, (metric.get)(m)))
                    .collect()
            };
            Panel {
                title: metric.label.to_string(),
                x_label: "step".into(),
                series: vec![
                    Series {
                        name: "train".into(),
                        points: points(history),
                        color: TRAIN_COLOR,
                        markers: false,
                    },
                    Series {
                        name: "eval".into(),
                        points: points(evaluations),
                        color: EVAL_COLOR,
                        markers: true,
                    },
                ],
            }
        })
        .collect();
    render_png(&panels, 2, path)
}

/// Draws `panels` in a grid of `columns` and writes the PNG.
pub fn render_png(panels: &[Panel], columns: usize, path: impl AsRef<Path>) -> Result<()> {
    let columns = columns.max(1);
    let rows = panels.len().div_ceil(columns).max(1);
    let mut canvas = Canvas::new(columns * PANEL_WIDTH, rows * PANEL_HEIGHT);
    for (i, panel) in panels.iter().enumerate() {
        canvas.draw_panel(
            panel,
            (i % columns) * PANEL_WIDTH,
            (i / columns) * PANEL_HEIGHT,
        );
    }
    canvas.write_png(path.as_ref())
}

/// An RGB image in memory.
struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Self {
        Canvas {
            width,
            height,
            pixels: vec![255; width * height * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, color: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let at = (y as usize * self.width + x as usize) * 3;
            self.pixels[at..at + 3].copy_from_slice(&color);
        }
    }

    /// A line two pixels wide (Bresenham).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), color: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut error) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, color);
            self.set(x, y + 1, color);
            if x == x1 && y == y1 {
                break;
            }
            let doubled = 2 * error;
            if doubled >= dy {
                error += dy;
                x += sx;
            }
            if doubled <= dx {
                error += dx;
                y += sy;
            }
        }
    }

    fn rectangle(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, color: [u8; 3]) {
        for x in x0..=x1 {
            self.set(x, y0, color);
            self.set(x, y1, color);
        }
        for y in y0..=y1 {
            self.set(x0, y, color);
            self.set(x1, y, color);
        }
    }

    /// Text at `(x, y)` (top left) with glyphs scaled `scale` times.
    fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, color: [u8; 3]) {
        for (i, c) in text.chars().enumerate() {
            let glyph = glyph(c);
            for (row, bits) in glyph.iter().enumerate() {
                for column in 0..5 {
                    if bits & (0x10 >> column) != 0 {
                        for (a, b) in (0..scale).flat_map(|a| (0..scale).map(move |b| (a, b))) {
                            self.set(
                                x + (i as i64 * 6 + column) * scale + a,
                                y + row as i64 * scale + b,
                                color,
                            );
                        }
                    }
                }
            }
        }
    }

    fn draw_panel(&mut self, panel: &Panel, left: usize, top: usize) {
        let (x0, y0) = ((left + LEFT) as i64, (top + TOP) as i64);
        let (x1, y1) = (
            (left + PANEL_WIDTH - RIGHT) as i64,
            (top + PANEL_HEIGHT - BOTTOM) as i64,
        );
        let black = [0, 0, 0];
        self.text(x0, (top + 6) as i64, &panel.title, 2, black);
        self.rectangle(x0, y0, x1, y1, [120, 120, 120]);
        let finite: Vec<(f64, f64)> = panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        if finite.is_empty() {
            self.text(x0 + 10, y0 + 10, "no data", 2, black);
            return;
        }
        let (x_min, x_max) = bounds(finite.iter().map(|p| p.0), 0.0);
        let (low, high) = bounds(finite.iter().map(|p| p.1), 0.05);
        let ticks = RoundTicks::covering(low, high);
        let (y_min, y_max) = (ticks.first(), ticks.last());
        let to_pixel = |(x, y): (f64, f64)| {
            let px = x0 + ((x - x_min) / (x_max - x_min) * (x1 - x0) as f64).round() as i64;
            let py = y1 - ((y - y_min) / (y_max - y_min) * (y1 - y0) as f64).round() as i64;
            (px, py)
        };
        for value in ticks.values() {
            let (_, y) = to_pixel((x_min, value));
            self.line((x0 - 4, y), (x0, y), black);
            let label = ticks.label(value);
            self.text(x0 - 8 - label.len() as i64 * 12, y - 7, &label, 2, black);
        }
        let (first, last) = (tick_label(x_min), tick_label(x_max));
        self.text(x0, y1 + 8, &first, 2, black);
        self.text(x1 - last.len() as i64 * 12, y1 + 8, &last, 2, black);
        self.text(
            (x0 + x1) / 2 - panel.x_label.len() as i64 * 6,
            y1 + 8,
            &panel.x_label,
            2,
            [90, 90, 90],
        );
        for (k, series) in panel.series.iter().enumerate() {
            let points: Vec<(i64, i64)> = series
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(to_pixel)
                .collect();
            for pair in points.windows(2) {
                self.line(pair[0], pair[1], series.color);
            }
            if series.markers || points.len() == 1 {
                for &(x, y) in &points {
                    self.rectangle(x - 3, y - 3, x + 3, y + 3, series.color);
                }
            }
            // Legend on its own line under the title, clear of the curves.
            let legend_x = x0 + 100 * k as i64;
            let legend_y = (top + 28) as i64;
            self.line(
                (legend_x, legend_y + 6),
                (legend_x + 20, legend_y + 6),
                series.color,
            );
            self.text(legend_x + 26, legend_y, &series.name, 2, series.color);
        }
    }

    fn write_png(&self, path: &Path) -> Result<()> {
        let file = std::fs::File::create(path).map_err(|e| RefaError::io(path, &e))?;
        let mut encoder = png::Encoder::new(
            std::io::BufWriter::new(file),
            self.width as u32,
            self.height as u32,
        );
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let failed = |e: png::EncodingError| RefaError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
            source: Some(ErrorSource::new(e)),
        };
        let mut writer = encoder.write_header().map_err(failed)?;
        writer.write_image_data(&self.pixels).map_err(failed)
    }
}

/// `(min, max)` widened by `margin` of the range on each side, never empty.
fn bounds(values: impl Iterator<Item = f64>, margin: f64) -> (f64, f64) {
    let (min, max) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let pad = if max > min {
        (max - min) * margin
    } else {
        0.5 * max.abs().max(1.0)
    };
    (min - pad, max + pad)
}

/// Round axis ticks: a step of 1, 2 or 5 × 10^k that gives 3 to 6 ticks over the data, the
/// axis widened to whole steps, and labels with the decimals the step needs (0.25, not
/// 0.292).
struct RoundTicks {
    start: f64,
    step: f64,
    count: usize,
}

impl RoundTicks {
    fn covering(min: f64, max: f64) -> Self {
        let rough = (max - min) / 4.0;
        let power = 10f64.powf(rough.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .into_iter()
            .map(|m| m * power)
            .find(|s| *s >= rough)
            .unwrap_or(10.0 * power);
        let start = (min / step).floor() * step;
        let count = ((max - start) / step).ceil().max(1.0) as usize + 1;
        RoundTicks { start, step, count }
    }

    fn values(&self) -> impl Iterator<Item = f64> + '_ {
        (0..self.count).map(|i| self.start + i as f64 * self.step)
    }

    fn first(&self) -> f64 {
        self.start
    }

    fn last(&self) -> f64 {
        self.start + (self.count - 1) as f64 * self.step
    }

    fn label(&self, value: f64) -> String {
        let decimals = (-self.step.log10().floor()).clamp(0.0, 6.0) as usize;
        let magnitude = value.abs().max(self.step);
        if !(1e-3..1e5).contains(&magnitude) {
            return tick_label(value);
        }
        // `+ 0.0` turns −0 into 0.
        format!("{:.decimals$}", value + 0.0)
    }
}

/// At most 8 characters: integers as they are, fixed point for ordinary magnitudes,
/// scientific otherwise.
fn tick_label(value: f64) -> String {
    let magnitude = value.abs();
    if value.fract() == 0.0 && magnitude < 1e6 {
        format!("{value:.0}")
    } else if magnitude != 0.0 && !(1e-3..1e5).contains(&magnitude) {
        format!("{value:.1e}")
    } else if magnitude >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.3}")
    }
}

/// 5×7 glyph rows, bit 4 leftmost. Uppercase letters are drawn in lowercase.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_lowercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        'a' => [0, 0, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E],
        'c' => [0, 0, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F],
        'e' => [0, 0, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08],
        'g' => [0, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'j' => [0x02, 0, 0x06, 0x02, 0x02, 0x12, 0x0C],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0, 0, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'n' => [0, 0, 0x16, 0x19, 0x11, 0x11, 0x11],
        'o' => [0, 0, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0, 0, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'q' => [0, 0, 0x0D, 0x13, 0x0F, 0x01, 0x01],
        'r' => [0, 0, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0, 0, 0x0E, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'u' => [0, 0, 0x11, 0x11, 0x11, 0x13, 0x0D],
        'v' => [0, 0, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'w' => [0, 0, 0x11, 0x11, 0x15, 0x15, 0x0A],
        'x' => [0, 0, 0x11, 0x0A, 0x04, 0x0A, 0x11],
        'y' => [0, 0, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'z' => [0, 0, 0x1F, 0x02, 0x04, 0x08, 0x1F],
        _ => [0; 7],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_printable_character_of_the_titles_has_a_glyph() {
        for c in "loss margin (s+ - s-) positive mass eos probability step train eval 0123456789.e-"
            .chars()
        {
            assert!(c == ' ' || glyph(c).iter().any(|&row| row != 0), "{c:?}");
        }
    }

    #[test]
    fn ticks_are_round_numbers() {
        let ticks = RoundTicks::covering(-0.056, 1.186);
        let labels: Vec<String> = ticks.values().map(|v| ticks.label(v)).collect();
        assert_eq!(labels, ["-0.5", "0.0", "0.5", "1.0", "1.5"]);
        assert!(ticks.first() <= -0.056 && ticks.last() >= 1.186);
        let ticks = RoundTicks::covering(0.0031, 0.0087);
        let labels: Vec<String> = ticks.values().map(|v| ticks.label(v)).collect();
        assert_eq!(labels, ["0.002", "0.004", "0.006", "0.008", "0.010"]);
    }

    #[test]
    fn tick_labels_stay_short() {
        for v in [0.0, 1.0, -0.123456, 12345.6, 1e-7, -3e9, 99.99] {
            assert!(tick_label(v).len() <= 8, "{v}: {}", tick_label(v));
        }
    }
}
