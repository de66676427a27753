//! `finetune`'s output: the loss plot from its `metrics.jsonl`, and the summary table.

use std::path::Path;

type Error = Box<dyn std::error::Error>;

/// (step, loss) points of a curve.
pub type Curve = Vec<(usize, f32)>;

/// The train-loss and eval-loss curves of `method` in `metrics.jsonl`.
pub fn curves_from_metrics(path: &Path, method: &str) -> Result<(Curve, Curve), Error> {
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for v in crate::train::read_jsonl(path)? {
        let Some(step) = v["step"].as_u64().filter(|_| v["method"] == method) else {
            continue;
        };
        if let Some(loss) = v["loss"].as_f64() {
            train.push((step as usize, loss as f32));
        }
        if let Some(loss) = v["eval_loss"].as_f64() {
            eval.push((step as usize, loss as f32));
        }
    }
    Ok((train, eval))
}

/// Train (smoothed, thin) and eval (thick) loss per method.
pub fn plot(path: &Path, curves: &[(String, Curve, Curve)], steps: usize) -> Result<(), Error> {
    use plotters::prelude::*;
    // plotters draws text with a font it is given; the bundled DejaVu Sans Mono (its license
    // is in assets/fonts/LICENSE) keeps this working without system fonts.
    static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSansMono.ttf");
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let max = curves
        .iter()
        .flat_map(|(_, t, e)| t.iter().chain(e))
        .map(|p| p.1)
        .fold(0.5f32, f32::max)
        .min(4.0);
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "fine-tuning loss (thin: train, smoothed; thick: eval)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(0usize..steps.max(1), 0f32..max * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss (nats/token)")
        .draw()?;
    for (name, train, eval) in curves {
        let color = match name.as_str() {
            "lisa" => BLUE,
            "lora" => RED,
            _ => GREEN,
        };
        let smooth: Vec<(usize, f32)> = train
            .iter()
            .enumerate()
            .map(|(i, &(s, _))| {
                let w = &train[i.saturating_sub(9)..=i];
                (s, w.iter().map(|p| p.1).sum::<f32>() / w.len() as f32)
            })
            .collect();
        chart.draw_series(LineSeries::new(smooth, color.mix(0.5)))?;
        chart
            .draw_series(LineSeries::new(eval.clone(), color.stroke_width(3)))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The summary table of every method, from `summary.json`'s objects.
pub fn print_summaries(summaries: &[serde_json::Value]) {
    println!(
        "{:<6} {:>7} {:>10} {:>9} {:>9} {:>8} {:>9} {:>10} {:>11} {:>10}",
        "method",
        "steps",
        "train loss",
        "eval loss",
        "accuracy",
        "time",
        "tok/s",
        "peak heap",
        "trainable",
        "opt. state"
    );
    let mb = |v: &serde_json::Value| format!("{:.1} MB", v.as_f64().unwrap_or(0.0) / 1e6);
    for s in summaries {
        let acc = s["accuracy"]
            .as_f64()
            .map_or("-".into(), |a| format!("{:.1}%", 100.0 * a));
        let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<6} {:>7} {:>10.3} {:>9.3} {:>9} {:>7.1}s {:>9.0} {:>10} {:>11} {:>10}",
            s["method"].as_str().unwrap_or(""),
            s["steps"].as_u64().unwrap_or(0),
            f("final_train_loss"),
            f("eval_loss"),
            acc,
            f("wall_seconds"),
            f("tokens_per_second"),
            mb(&s["peak_bytes"]),
            s["trainable_params"].as_u64().unwrap_or(0),
            mb(&s["state_bytes"])
        );
    }
}
