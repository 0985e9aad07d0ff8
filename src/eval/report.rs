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
        match loss_png(&format!("{title}: training loss"), curves) {
            Ok(png) => out.push(("loss.png", png)),
            Err(e) => tracing::warn!("{title}: loss.png left out: {e}"),
        }
    }
    out
}
