//! A report folder's files: `metrics.json` (every result), `results.md` (the table), `metrics.png`
//! (Hit/NDCG per model) and `loss.png` (training curves). Plots that cannot be drawn (no font) are
//! left out with a warning; the numbers are always written.

use super::plots::{loss_png, metrics_png, LossCurve};
use super::{markdown_table, EvalResult};

/// (file name, bytes) of the report of `title`.
pub fn files(title: &str, results: &[EvalResult], curves: &[LossCurve]) -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    if !results.is_empty() {
        let json: Vec<serde_json::Value> = results.iter().map(EvalResult::to_json).collect();
        out.push(("metrics.json", serde_json::to_vec_pretty(&json).unwrap_or_default()));
        out.push(("results.md", format!("# {title}\n\n{}", markdown_table(results)).into_bytes()));
        match metrics_png(title, results) {
            Ok(png) => out.push(("metrics.png", png)),
            Err(e) => tracing::warn!("{title}: metrics.png left out: {e}"),
        }
    }
    if curves.iter().any(|c| !c.points.is_empty()) {
        match loss_png(&format!("{title}: training loss and validation"), curves) {
            Ok(png) => out.push(("loss.png", png)),
            Err(e) => tracing::warn!("{title}: loss.png left out: {e}"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Split;
    use crate::eval::metrics::Metrics;

    fn result(model: &str, hit5: f64) -> EvalResult {
        EvalResult {
            model: model.into(),
            protocol: "sampled:100".into(),
            split: Split::Test,
            users: 10,
            metrics: Metrics(vec![("hit@5".into(), hit5), ("ndcg@5".into(), hit5 / 2.0)]),
        }
    }

    #[test]
    fn a_report_holds_the_numbers_the_table_and_two_plots() {
        let results = [result("pop", 0.25), result("illmrec", 0.5)];
        let curve = LossCurve {
            label: "r".into(),
            points: (1..=50).map(|s| (s, 1.0 / s as f64)).collect(),
            validation: vec![(10, 0.1), (20, 0.25), (30, 0.2)],
            validation_metric: "ndcg@10".into(),
        };
        let files = files("t", &results, &[curve]);
        let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["metrics.json", "results.md", "metrics.png", "loss.png"]);
        let json: serde_json::Value = serde_json::from_slice(&files[0].1).unwrap();
        assert_eq!(json[1]["model"], "illmrec");
        assert_eq!(json[1]["metrics"]["hit@5"], 0.5);
        let md = String::from_utf8(files[1].1.clone()).unwrap();
        assert!(md.contains("| illmrec | sampled:100 | 10 | 0.5000 | 0.2500 |"), "{md}");
        for (name, png) in &files[2..] {
            let img = image::load_from_memory(png).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!((img.width(), img.height()), (960, 540), "{name}");
            // Not a blank canvas: bars and lines put colour on it.
            let rgb = img.to_rgb8();
            let coloured = rgb.pixels().filter(|p| p.0[0].abs_diff(p.0[2]) > 60).count();
            assert!(coloured > 1000, "{name}: only {coloured} coloured pixels");
        }
    }
}
