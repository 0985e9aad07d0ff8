//! MSRBench's five ways of putting a large vision-language model to work in sequential
//! recommendation (docs/msrbench-method.md): as recommender (S1), item enhancer (S2), reranker (S3),
//! and enhancer + recommender / reranker (S4, S5). A strategy is a composition of parts:
//!
//! - `prompt`: the templates (`prompts/lvlm/`) and their rendering;
//! - `images`: the history's pictures, one composite image or one per item;
//! - `backend`: what answers (an OpenAI-compatible endpoint, a text model or a VLM in process);
//! - `grammar`: the answer shape in-process decoding is held to;
//! - `answer`: reading an answer back onto the candidates;
//! - `cache`: answers in the store, keyed by the request's hash;
//! - `run`: S1/S3/S4/S5 over a set of users, with metrics and costs; `s2`: S2's item table.
//!
//! Captions, S2's and S4/S5's input, are a `features` kind (`features::captions`).

pub mod answer;
pub mod backend;
pub mod cache;
pub mod config;
pub mod grammar;
pub mod images;
pub mod prompt;
pub mod run;
pub mod s2;

pub use config::{BackboneConfig, LocalConfig, LvlmConfig, Modalities, Strategy};
pub use run::{candidate_lists, Cost, Inputs, StrategyReport, UserAnswer};

use crate::eval::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum LvlmError {
    /// The backend cannot go on (refused credentials, a model that does not load).
    #[error("backbone: {0}")]
    Backend(String),
    #[error(transparent)]
    Prompt(#[from] prompt::PromptError),
    #[error(transparent)]
    Image(#[from] images::ImageError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error("{0}")]
    Invalid(String),
}

/// The files a strategy run leaves in its report folder: `eval-test.json` (the shape `eval` writes),
/// `answers.jsonl` (every user's answer and explanation), `cost.json` and `results.md`.
pub fn report_files(label: &str, protocol: &str, report: &StrategyReport) -> Vec<(&'static str, Vec<u8>)> {
    let eval = serde_json::json!([{
        "model": label,
        "protocol": protocol,
        "users": report.cost.users,
        "metrics": report.metrics.to_json(),
    }]);
    let mut answers = Vec::new();
    for a in &report.answers {
        answers.extend(serde_json::to_vec(a).unwrap_or_default());
        answers.push(b'\n');
    }
    vec![
        ("eval-test.json", serde_json::to_vec_pretty(&eval).unwrap_or_default()),
        ("answers.jsonl", answers),
        ("cost.json", serde_json::to_vec_pretty(&report.cost).unwrap_or_default()),
        ("results.md", cost_table(&[(label.to_string(), &report.metrics, &report.cost)]).into_bytes()),
    ]
}

/// Metrics next to costs, one row per run: the README's table.
pub fn cost_table(rows: &[(String, &Metrics, &Cost)]) -> String {
    let Some((_, first, _)) = rows.first() else { return String::new() };
    let names: Vec<&str> = first.0.iter().map(|(n, _)| n.as_str()).collect();
    let mut out = format!(
        "| strategy | users | {} | s/user | prompt tokens | parse failures % | hallucinations % |\n",
        names.join(" | ")
    );
    out += &format!("|---|---:|{}---:|---:|---:|---:|\n", "---:|".repeat(names.len()));
    for (label, m, c) in rows {
        let vals: Vec<String> = names.iter().map(|n| format!("{:.2}", 100.0 * m.get(n).unwrap_or(0.0))).collect();
        out += &format!(
            "| {label} | {} | {} | {:.2} | {:.0} | {:.1} | {:.1} |\n",
            c.users,
            vals.join(" | "),
            c.seconds_per_user,
            c.prompt_tokens_mean,
            c.parse_failure_pct,
            c.hallucination_pct
        );
    }
    out
}
