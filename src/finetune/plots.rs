//! The training curves as an SVG drawn with plotters: above, the training loss of every
//! optimizer step and the validation loss where it was measured (before training, at
//! each `eval_every`, after); below, the learning rate of every step. Axes carry units
//! and ticks, and each panel a legend.

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// What the plot shows.
pub struct Curves<'a> {
    /// Training loss of step 1, 2, … (nats per target token).
    pub train: &'a [f64],
    /// Learning rate of step 1, 2, ….
    pub learning_rate: &'a [f64],
    /// (step, validation loss); step 0 is before training.
    pub val: &'a [(usize, f64)],
}

/// A value range that holds every finite value with a margin (a flat series gets one).
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let margin = ((hi - lo) * 0.08).max(hi.abs() * 0.02).max(1e-6);
    ((lo - margin).max(0.0), hi + margin)
}

fn drawing<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow!("cannot draw the training curves: {e}")
}

pub fn training_curves(c: &Curves) -> Result<String> {
    let steps = c.train.len().max(c.learning_rate.len()).max(1) as f64;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (820, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        let (top, bottom) = root.split_vertically(400);
        let (lo, hi) = padded_range(c.train.iter().chain(c.val.iter().map(|v| &v.1)).copied());
        let mut loss = ChartBuilder::on(&top)
            .caption("Loss by optimizer step", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..steps, lo..hi)
            .map_err(drawing)?;
        loss.configure_mesh()
            .x_desc("optimizer step")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_desc("loss (nats / target token)")
            .y_label_formatter(&|v| format!("{v:.2}"))
            .draw()
            .map_err(drawing)?;
        let train = c
            .train
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| ((i + 1) as f64, l));
        loss.draw_series(LineSeries::new(train, BLUE.stroke_width(2)))
            .map_err(drawing)?
            .label("training (the step's micro-batches)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        if !c.val.is_empty() {
            let val: Vec<(f64, f64)> = c
                .val
                .iter()
                .filter(|(_, v)| v.is_finite())
                .map(|&(s, v)| (s as f64, v))
                .collect();
            loss.draw_series(LineSeries::new(val.clone(), RED.stroke_width(2)))
                .map_err(drawing)?
                .label("validation")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
            loss.draw_series(val.iter().map(|&p| Circle::new(p, 4, RED.filled())))
                .map_err(drawing)?;
        }
        loss.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(drawing)?;

        let (_, lr_hi) = padded_range(c.learning_rate.iter().copied());
        let mut lr = ChartBuilder::on(&bottom)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..steps, 0f64..lr_hi)
            .map_err(drawing)?;
        lr.configure_mesh()
            .x_desc("optimizer step")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_desc("learning rate")
            .y_label_formatter(&|v| format!("{v:.1e}"))
            .y_labels(5)
            .draw()
            .map_err(drawing)?;
        let rates = c
            .learning_rate
            .iter()
            .enumerate()
            .map(|(i, &r)| ((i + 1) as f64, r));
        lr.draw_series(LineSeries::new(rates, GREEN.stroke_width(2)))
            .map_err(drawing)?
            .label("learning rate (warmup, then cosine)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN.stroke_width(2)));
        lr.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(drawing)?;
        root.present().map_err(drawing)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plot_has_axes_legends_and_both_curves() {
        let train = [3.2, 2.5, 1.9, f64::NAN, 1.2];
        let lr = [1e-4, 2e-4, 1.5e-4, 1e-4, 0.5e-4];
        let val = [(0, 3.1), (2, 2.0), (5, 1.4)];
        let svg = training_curves(&Curves {
            train: &train,
            learning_rate: &lr,
            val: &val,
        })
        .unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        for text in [
            "optimizer step",
            "loss (nats / target token)",
            "learning rate",
            "validation",
            "training (the step",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        // One marker per validation point.
        assert_eq!(svg.matches("<circle").count(), val.len());
    }
}
