//! PNG plots for people: the loss curves of training runs and Hit/NDCG per model. Drawn with
//! plotters into memory, encoded with `image`, so they can go to any storage root. Text needs a
//! TrueType font: ILLMREC_FONT, else DejaVu Sans or Liberation Sans where Linux distributions put
//! them (scripts/setup.sh installs fonts-dejavu-core).

use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use super::EvalResult;

const FONT: &str = "sans-serif";
const SIZE: (u32, u32) = (960, 540);
/// Pixels to the right of the bar charts for their legend.
const LEGEND_WIDTH: u32 = 170;
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// One training run's losses by step, and its validation metric by step where it validated.
#[derive(Debug, Clone, Default)]
pub struct LossCurve {
    pub label: String,
    pub points: Vec<(u64, f64)>,
    pub validation: Vec<(u64, f64)>,
    /// What `validation` measures (`ndcg@10`, ...).
    pub validation_metric: String,
}

fn font_paths() -> Vec<std::path::PathBuf> {
    let mut paths: Vec<std::path::PathBuf> = std::env::var_os("ILLMREC_FONT").map(Into::into).into_iter().collect();
    for p in [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/Library/Fonts/Arial.ttf",
        "/System/Library/Fonts/Supplemental/Arial.ttf",
    ] {
        paths.push(p.into());
    }
    paths
}

/// Registers the first font found, once; an error names the places looked at.
fn ensure_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let paths = font_paths();
            for p in &paths {
                if let Ok(bytes) = std::fs::read(p) {
                    // plotters keeps fonts for the life of the process.
                    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                    if plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok() {
                        return Ok(());
                    }
                }
            }
            let tried: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            Err(format!("no TrueType font for plot labels (set ILLMREC_FONT; looked at {})", tried.join(", ")))
        })
        .clone()
}

/// Renders into an RGB buffer and encodes it as PNG.
fn png(
    draw: impl FnOnce(DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Result<(), String>,
) -> Result<Vec<u8>, String> {
    ensure_font()?;
    let mut rgb = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let area = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
        area.fill(&WHITE).map_err(|e| e.to_string())?;
        draw(area.clone())?;
        area.present().map_err(|e| e.to_string())?;
    }
    let img = image::RgbImage::from_raw(SIZE.0, SIZE.1, rgb).ok_or("plot buffer has the wrong size")?;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).map_err(|e| e.to_string())?;
    Ok(out.into_inner())
}

/// Mean of the last `window` values at each point: the trend through per-step noise.
fn moving_average(points: &[(u64, f64)], window: usize) -> Vec<(u64, f64)> {
    let mut sum = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            sum += y;
            if i >= window {
                sum -= points[i - window].1;
            }
            (x, sum / (i + 1).min(window) as f64)
        })
        .collect()
}

/// Training loss by step: each run's raw losses (thin) and their moving average (bold); below, when
/// runs validated, their validation metric by step (the best point marked).
pub fn loss_png(title: &str, curves: &[LossCurve]) -> Result<Vec<u8>, String> {
    let all = curves.iter().flat_map(|c| c.points.iter());
    let (max_x, min_y, max_y) =
        all.fold((1u64, f64::INFINITY, f64::NEG_INFINITY), |(mx, lo, hi), &(x, y)| (mx.max(x), lo.min(y), hi.max(y)));
    if !min_y.is_finite() {
        return Err("no losses to plot".into());
    }
    let validated = curves.iter().any(|c| !c.validation.is_empty());
    let pad = ((max_y - min_y) * 0.05).max(1e-3);
    png(|area| {
        let (top, bottom) = if validated {
            let (t, b) = area.split_vertically((SIZE.1 * 3 / 5) as i32);
            (t, Some(b))
        } else {
            (area, None)
        };
        let mut chart = ChartBuilder::on(&top)
            .caption(title, (FONT, 24))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..max_x as f64, (min_y - pad)..(max_y + pad))
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 17))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, c) in curves.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let raw = c.points.iter().map(|&(x, y)| (x as f64, y));
            chart.draw_series(LineSeries::new(raw, colour.mix(0.25))).map_err(|e| e.to_string())?;
            let window = (c.points.len() / 25).clamp(1, 200);
            let smooth = moving_average(&c.points, window).into_iter().map(|(x, y)| (x as f64, y));
            chart
                .draw_series(LineSeries::new(smooth, colour.stroke_width(3)))
                .map_err(|e| e.to_string())?
                .label(format!("{} (mean of {window})", c.label))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(3)));
        }
        chart
            .configure_series_labels()
            .label_font((FONT, 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| e.to_string())?;
        if let Some(bottom) = bottom {
            validation_panel(&bottom, curves, max_x)?;
        }
        Ok(())
    })
}

/// The validation metric of each run by step, with its best point marked.
fn validation_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    curves: &[LossCurve],
    max_x: u64,
) -> Result<(), String> {
    let values = curves.iter().flat_map(|c| c.validation.iter().map(|p| p.1));
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let pad = ((hi - lo) * 0.1).max(1e-3);
    let metrics: Vec<&str> = curves.iter().map(|c| c.validation_metric.as_str()).filter(|m| !m.is_empty()).collect();
    let metric = metrics.first().copied().unwrap_or("metric");
    let max_x = curves.iter().flat_map(|c| c.validation.iter().map(|p| p.0)).fold(max_x, u64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(format!("validation {metric} (valid split)"), (FONT, 18))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..max_x as f64, (lo - pad).max(0.0)..(hi + pad))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(metric)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, c) in curves.iter().enumerate().filter(|(_, c)| !c.validation.is_empty()) {
        let colour = PALETTE[i % PALETTE.len()];
        let pts: Vec<(f64, f64)> = c.validation.iter().map(|&(x, y)| (x as f64, y)).collect();
        chart.draw_series(LineSeries::new(pts.iter().copied(), colour.stroke_width(2))).map_err(|e| e.to_string())?;
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled()))).map_err(|e| e.to_string())?;
        if let Some(&best) = pts.iter().max_by(|a, b| a.1.total_cmp(&b.1)) {
            chart
                .draw_series(std::iter::once(Circle::new(best, 7, colour.stroke_width(2))))
                .map_err(|e| e.to_string())?
                .label(format!("{}: best {:.4} at step {:.0}", c.label, best.1, best.0))
                .legend(move |(x, y)| Circle::new((x + 10, y), 5, colour.stroke_width(2)));
        }
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| e.to_string())
}

/// Hit@k and NDCG@k of every model, grouped by metric; one panel per protocol.
pub fn metrics_png(title: &str, results: &[EvalResult]) -> Result<Vec<u8>, String> {
    let mut protocols: Vec<String> = Vec::new();
    let mut models: Vec<String> = Vec::new();
    for r in results {
        let p = r.protocol.clone();
        if !protocols.contains(&p) {
            protocols.push(p);
        }
        if !models.contains(&r.model) {
            models.push(r.model.clone());
        }
    }
    let metrics: Vec<String> =
        results.first().map(|r| r.metrics.0.iter().map(|(n, _)| n.clone()).collect()).unwrap_or_default();
    if metrics.is_empty() {
        return Err("no metrics to plot".into());
    }
    png(|area| {
        let area = area.titled(title, (FONT, 24)).map_err(|e| e.to_string())?;
        let panels = area.split_evenly((protocols.len(), 1));
        for (panel, protocol) in panels.iter().zip(&protocols) {
            let rows: Vec<&EvalResult> = results.iter().filter(|r| r.protocol == *protocol).collect();
            let top = rows.iter().flat_map(|r| r.metrics.0.iter().map(|(_, v)| *v)).fold(0.0f64, f64::max);
            let n = metrics.len();
            // The legend gets a column of its own to the right, so it never covers a bar.
            let (plot, legend) = panel.split_horizontally((SIZE.0 - LEGEND_WIDTH) as i32);
            let mut chart = ChartBuilder::on(&plot)
                .caption(format!("protocol {protocol}, test split"), (FONT, 18))
                .margin(12)
                .x_label_area_size(30)
                .y_label_area_size(56)
                .build_cartesian_2d(0f64..n as f64, 0f64..(top * 1.15).max(1e-3))
                .map_err(|e| e.to_string())?;
            let names = metrics.clone();
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(n * 2 + 1)
                .x_label_formatter(&move |x| {
                    let i = x.floor() as usize;
                    if (x - i as f64 - 0.5).abs() < 0.26 && i < names.len() {
                        names[i].clone()
                    } else {
                        String::new()
                    }
                })
                .label_style((FONT, 14))
                .light_line_style(RGBColor(235, 235, 235))
                .draw()
                .map_err(|e| e.to_string())?;
            let width = 0.8 / models.len() as f64;
            for (j, model) in models.iter().enumerate() {
                let colour = PALETTE[j % PALETTE.len()];
                let Some(row) = rows.iter().find(|r| &r.model == model) else { continue };
                let bars = metrics.iter().enumerate().filter_map(|(i, m)| {
                    let v = row.metrics.get(m)?;
                    let x0 = i as f64 + 0.1 + j as f64 * width;
                    Some(Rectangle::new([(x0, 0.0), (x0 + width * 0.92, v)], colour.filled()))
                });
                chart.draw_series(bars).map_err(|e| e.to_string())?;
                let y = 40 + 22 * j as i32;
                legend.draw(&Rectangle::new([(8, y - 7), (22, y + 7)], colour.filled())).map_err(|e| e.to_string())?;
                legend
                    .draw(&Text::new(model.clone(), (28, y - 8), (FONT, 14).into_font()))
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_average_is_the_mean_of_the_window() {
        let pts = [(1, 1.0), (2, 3.0), (3, 5.0), (4, 7.0)];
        assert_eq!(moving_average(&pts, 2), vec![(1, 1.0), (2, 2.0), (3, 4.0), (4, 6.0)]);
    }
}
