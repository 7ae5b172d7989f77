//! PNG plots: training curves and loss by context position (the paper's figure).
//!
//! Text is drawn with the embedded DejaVu Sans, so plots render on machines with no fonts.

use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| ())
            .expect("embedded font is valid");
    });
}

/// One line of a plot.
pub struct Series {
    /// Legend label.
    pub label: String,
    /// (x, y) points.
    pub points: Vec<(f64, f64)>,
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Each series as a coloured line, and the legend, on a chart with f64 coordinates (linear or
/// logarithmic): what [`line_plot`] and [`panels_plot`] share.
fn draw_lines<'a, DB: DrawingBackend + 'a, CT: CoordTranslate<From = (f64, f64)>>(
    chart: &mut ChartContext<'a, DB, CT>,
    series: &[Series],
    font_size: u32,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    for (i, s) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", font_size))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
}

/// One panel of [`panels_plot`].
pub struct Panel {
    /// Panel title.
    pub title: String,
    /// Its lines.
    pub series: Vec<Series>,
    /// A dashed vertical marker (e.g. the training context), if any.
    pub marker: Option<f64>,
}

/// Panels side by side in one PNG, each with its own x range and one shared y range (so
/// levels compare across panels), with `x_label`/`y_label` on every panel.
pub fn panels_plot(
    path: &Path,
    x_label: &str,
    y_label: &str,
    panels: &[Panel],
) -> Result<(), String> {
    register_font();
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let ys = panels
        .iter()
        .flat_map(|p| p.series.iter().flat_map(|s| s.points.iter()))
        .map(|p| p.1)
        .filter(|y| y.is_finite());
    let (y0, y1) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    if !y0.is_finite() || panels.is_empty() {
        return Err(format!("{}: nothing to plot", path.display()));
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let root = BitMapBackend::new(path, (560 * panels.len() as u32, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    for (area, panel) in root.split_evenly((1, panels.len())).iter().zip(panels) {
        let xs = panel
            .series
            .iter()
            .flat_map(|s| s.points.iter())
            .map(|p| p.0);
        let (x0, mut x1) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(x), b.max(x))
        });
        if !x0.is_finite() {
            continue;
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x1 * 1.02, y0..y1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| err(&e))?;
        if let Some(x) = panel.marker {
            let dashes = (0..40).map(|i| {
                let (a, b) = (
                    y0 + (y1 - y0) * i as f64 / 40.0,
                    y0 + (y1 - y0) * (i as f64 + 0.5) / 40.0,
                );
                PathElement::new(vec![(x, a), (x, b)], BLACK.mix(0.5).stroke_width(1))
            });
            chart.draw_series(dashes).map_err(|e| err(&e))?;
        }
        draw_lines(&mut chart, &panel.series, 13).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Draws `series` as lines into a PNG at `path`. `log_x` uses a logarithmic x axis.
pub fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
) -> Result<(), String> {
    register_font();
    let pts = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|p| p.0.is_finite() && p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if !x0.is_finite() {
        return Err(format!("{}: nothing to plot", path.display()));
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let root = BitMapBackend::new(path, (1000, 620)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .label_style(("sans-serif", 15))
                .draw()
                .map_err(|e| err(&e))?;
            draw_lines(&mut chart, series, 15).map_err(|e| err(&e))?;
        }};
    }
    if log_x {
        draw!(builder
            .build_cartesian_2d((x0.max(1e-9)..x1).log_scale(), y0..y1)
            .map_err(|e| err(&e))?);
    } else {
        draw!(builder
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(&e))?);
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
