//! The five strategies on a small synthetic image catalog, in process, through the binary: S1 and S3
//! through the vision path (a tiny moondream2 with random weights: a check of the code path, not of
//! what a real VLM would answer), S2 with tiny-BLIP captions and the tiny BERT initialising SASRec,
//! S4 and S5 through the list-constrained tiny Llama with those captions, and `run` with a strategy
//! in the job.

use std::path::Path;
use std::process::Command;

#[allow(dead_code)] // this file uses one of the shared helpers
mod common;

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_illmrec")).args(args).current_dir(dir).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "illmrec {args:?}:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

fn result(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn answers(dir: &Path, run: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("store/runs").join(run).join("report/answers.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn write_job(dir: &Path, name: &str, lvlm_extra: &str) {
    let text = format!(
        "name: syn\n{}train:\n  models: [pop]\n  sasrec: {{epochs: 4, eval_every: 2, patience: 1, \
         early_stopping_protocol: sampled:29}}\neval: {{ks: [1, 5], protocols: [sampled:29]}}\nstorage: {{root: store}}\n\
         telemetry: {{progress: off}}\n",
        common::tiny_sections("")
    );
    std::fs::write(dir.join("base.yaml"), text).unwrap();
    let job = format!(
        "include: [base.yaml]\nmodel:\n  sasrec: {{hidden: 16, max_len: 10}}\nfeatures:\n  \
         captions: {{tiny_blip: {{seed: 4, max_tokens: 5}}}}\nlvlm:\n  protocol: sampled:9\n  users: 6\n  \
         max_history: 4\n  list_length: 4\n  max_tokens: 40\n  backbones:\n    \
         vlm: {{tiny_moondream: {{seed: 2}}}}\n    llm: {{llm: {{tiny: {{seed: 1}}}}}}\n  backbone: vlm\n{lvlm_extra}"
    );
    std::fs::write(dir.join(name), job).unwrap();
}

#[test]
fn all_five_strategies_run_on_a_synthetic_image_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_job(d, "job.yaml", "");
    write_job(d, "per-item.yaml", "  images: per_item\n");
    write_job(d, "images-only.yaml", "  modalities: image\n");
    write_job(d, "run.yaml", "  strategies: [s3]\n");
    ok(d, &["synth", "--job", "job.yaml"]);
    ok(d, &["prepare", "--job", "job.yaml"]);

    // S1: one composite image of the history plus the titles; every answer parses (constrained).
    let s1 = result(&ok(d, &["lvlm", "--job", "job.yaml", "--strategy", "s1", "--json"]));
    assert_eq!((s1["users"].as_u64(), s1["cost"]["requests_sent"].as_u64()), (Some(6), Some(6)));
    assert_eq!((s1["cost"]["parse_failures"].as_u64(), s1["cost"]["hallucinated_items"].as_u64()), (Some(0), Some(0)));
    let a1 = answers(d, "syn-s1-vlm");
    for a in &a1 {
        assert_eq!((a["images"].as_u64(), a["ranking"].as_array().unwrap().len()), (Some(1), 4), "{a}");
        assert!(a["prompt"].as_str().unwrap().contains("The attached image shows the"), "{a}");
    }
    // One image per item: as many images as history items.
    ok(d, &["lvlm", "--job", "per-item.yaml", "--strategy", "s1"]);
    for a in answers(d, "syn-s1-vlm") {
        let shown = a["prompt"].as_str().unwrap().lines().filter(|l| l.starts_with(char::is_numeric)).count() as u64;
        assert_eq!(a["images"].as_u64(), Some(shown), "{a}");
        assert!(a["prompt"].as_str().unwrap().contains("attached images show the items"));
    }
    // Images alone: the history's titles are not in the prompt.
    ok(d, &["lvlm", "--job", "images-only.yaml", "--strategy", "s1"]);
    for a in answers(d, "syn-s1-vlm") {
        assert!(!a["prompt"].as_str().unwrap().contains("The items the user bought"), "{a}");
    }

    // S3 reranks SASRec's order; S2 trains a SASRec whose item table starts from title + caption.
    ok(d, &["train", "--job", "job.yaml", "--model", "sasrec"]);
    let s3 = result(&ok(d, &["lvlm", "--job", "job.yaml", "--strategy", "s3", "--json"]));
    assert_eq!(s3["cost"]["parse_failures"].as_u64(), Some(0));
    assert!(answers(d, "syn-s3-vlm").iter().zip(&a1).any(|(x, y)| x["candidates"] != y["candidates"]));
    let s2 = result(&ok(d, &["lvlm", "--job", "job.yaml", "--strategy", "s2", "--json"]));
    assert_eq!((s2["model"].as_str(), s2["users"].as_u64()), (Some("s2"), Some(6)));
    assert!(s2["metrics"]["hit@5"].as_f64().is_some() && s2["cost"].is_null());
    let state: serde_json::Value = {
        let runs = d.join("store/runs/syn-s2/checkpoints");
        let latest = std::fs::read_to_string(runs.join("LATEST")).unwrap();
        serde_json::from_str(&std::fs::read_to_string(runs.join(latest.trim()).join("state.json")).unwrap()).unwrap()
    };
    assert_eq!(state["item_init"], true);

    // S4 / S5 through the tiny Llama: the history lines carry the captions.
    for s in ["s4", "s5"] {
        let r = result(&ok(d, &["lvlm", "--job", "job.yaml", "--strategy", s, "--backbone", "llm", "--json"]));
        assert_eq!((r["cost"]["parse_failures"].as_u64(), r["cost"]["requests_sent"].as_u64()), (Some(0), Some(6)));
        for a in answers(d, &format!("syn-{s}-llm")) {
            assert!(a["prompt"].as_str().unwrap().contains("(image: a picture of"), "{a}");
            assert_eq!(a["ranking"].as_array().unwrap().len(), 4);
        }
    }

    // `run` trains what the strategy needs and reports it with the models; the answers are cached.
    let out = ok(d, &["run", "--job", "run.yaml"]);
    assert!(out.contains("| s3 (vlm) | sampled:9 (1+9) | 6 |"), "{out}");
}
