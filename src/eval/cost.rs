//! The cost columns of MSRBench's Table 2 for a trained model: training seconds per epoch (from the
//! run's fit report) and inference seconds per user (timed while evaluating, ranking included).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    pub model: String,
    /// Training seconds per epoch, validation left out; none for models that learn nothing per epoch.
    pub train_seconds_per_epoch: Option<f64>,
    /// (what was scored, seconds per user): one entry per pass over the users, e.g. the fixed
    /// 1+29 lists (the paper's unit) or `full, sampled:100` scored together.
    pub inference_seconds_per_user: Vec<(String, f64)>,
}

/// `| model | train s/epoch | inference s/user (what) |`, one row per model.
pub fn markdown_table(costs: &[Cost]) -> String {
    let mut out = "| model | train s/epoch | inference s/user |\n|---|---:|---|\n".to_string();
    for c in costs {
        let train = c.train_seconds_per_epoch.map_or("-".to_string(), |s| format!("{s:.1}"));
        let infer: Vec<String> =
            c.inference_seconds_per_user.iter().map(|(what, s)| format!("{s:.2e} ({what})")).collect();
        out += &format!("| {} | {train} | {} |\n", c.model, infer.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_row_per_model() {
        let c = Cost {
            model: "freedom".into(),
            train_seconds_per_epoch: Some(12.345),
            inference_seconds_per_user: vec![("candidates (1+29)".into(), 0.0025)],
        };
        let pop = Cost { model: "pop".into(), train_seconds_per_epoch: None, inference_seconds_per_user: vec![] };
        let t = markdown_table(&[c, pop]);
        assert!(t.contains("| freedom | 12.3 | 2.50e-3 (candidates (1+29)) |"), "{t}");
        assert!(t.contains("| pop | - |  |"), "{t}");
    }
}
