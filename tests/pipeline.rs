//! The whole foundation on a small synthetic catalog, through the real binary: synth -> prepare ->
//! train Pop and SASRec -> eval. SASRec must learn the catalog's sequential habit that Pop cannot see,
//! and the same job must give the same numbers twice.

use std::path::Path;
use std::process::Command;

use illmrec::features::FeatureTable;
use illmrec::store::Store;

fn illmrec(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_illmrec")).args(args).current_dir(dir).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "illmrec {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

const JOB: &str = r#"
name: small
data:
  synth: {out: raw, items: 300, users: 400, categories: 6, seed: 5, image_size: 24, min_sequence: 6, max_sequence: 12}
  source:
    amazon: {reviews: raw/reviews.jsonl.gz, meta: raw/meta.jsonl.gz, images: raw/images}
  k_core: 3
  require_image: true
  negatives: 100
model:
  sasrec: {hidden: 32, max_len: 20}
train:
  sasrec: {epochs: 40, eval_every: 5, patience: 2, early_stopping_protocol: sampled:100}
storage:
  root: store
telemetry:
  progress: off
"#;

/// ndcg@10 of each protocol from `eval --json` (one object per line).
fn ndcg10(json_lines: &str) -> Vec<(String, f64)> {
    json_lines
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["protocol"].as_str().unwrap().to_string(), v["metrics"]["ndcg@10"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn sasrec_beats_pop_and_reruns_are_identical() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("job.yaml"), JOB).unwrap();
    illmrec(d, &["synth", "--job", "job.yaml"]);
    let first = illmrec(d, &["prepare", "--job", "job.yaml"]);
    assert!(first.contains(": prepared"), "{first}");
    let again = illmrec(d, &["prepare", "--job", "job.yaml"]);
    assert!(again.contains("already prepared (reused)"), "{again}");

    illmrec(d, &["train", "--job", "job.yaml", "--model", "pop"]);
    illmrec(d, &["train", "--job", "job.yaml", "--model", "sasrec"]);
    let pop = ndcg10(&illmrec(d, &["eval", "--job", "job.yaml", "--model", "pop", "--json"]));
    let sasrec = ndcg10(&illmrec(d, &["eval", "--job", "job.yaml", "--model", "sasrec", "--json"]));
    assert_eq!(pop.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(), ["full", "sampled:100", "sampled:29"]);
    for ((protocol, p), (_, s)) in pop.iter().zip(&sasrec) {
        assert!(*s > 1.5 * p, "{protocol}: sasrec ndcg@10 {s:.4} should clearly beat pop {p:.4}");
    }

    // One protocol, one JSON object of the documented shape.
    let one = illmrec(d, &["eval", "--job", "job.yaml", "--model", "pop", "--protocol", "sampled:29", "--json"]);
    assert_eq!(one.lines().count(), 1);
    let v: serde_json::Value = serde_json::from_str(one.trim()).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["model", "protocol", "users", "metrics"]);

    // SASRec's item table is saved as the CF feature, one row per item.
    let store = Store::open(&d.join("store").display().to_string()).unwrap();
    let ds = illmrec::data::snapshot::load(&store, "small").unwrap();
    let cf = FeatureTable::from_bytes(&store.get("runs/small-sasrec/features/cf.safetensors").unwrap(), "cf").unwrap();
    assert_eq!((cf.item_ids.len(), cf.dim), (ds.num_items(), 32));
    assert_eq!(cf.item_ids[0], ds.items[0].id);

    // Same job, same seed: bit-identical weights.
    let weights = || {
        let ckpt = illmrec::train::runs::load_latest(&store, "small-sasrec").unwrap().unwrap();
        ckpt.file("model.safetensors").unwrap().clone()
    };
    let before = weights();
    illmrec(d, &["train", "--job", "job.yaml", "--model", "sasrec"]);
    assert!(before == weights(), "retraining with the same seed changed the weights");
}

#[test]
fn bad_job_file_names_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("job.yaml"), JOB.replace("k_core: 3", "k_core: 3\n  kcore: 4")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_illmrec"))
        .args(["prepare", "--job", "job.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("job.yaml: key `data.kcore`: unknown field `kcore`"), "{err}");
}
