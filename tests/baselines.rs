//! MSRBench's recommender baselines through the real binary on a small synthetic image catalog with
//! the tiny seeded encoders: `illmrec run` trains Random, Pop, SASRec, MoRec (T, I, T+I), FREEDOM,
//! BM3, MMGCN and IISAN (T+I) and prints one table and the cost columns; bad item features are
//! refused naming the items.

use std::path::Path;
use std::process::Command;

use illmrec::store::Store;
use illmrec::tensorfile::TensorFile;

fn illmrec(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_illmrec")).args(args).current_dir(dir).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr)))
    }
}

const MODELS: [&str; 10] = [
    "random",
    "pop",
    "sasrec",
    "morec:text",
    "morec:image",
    "morec:text+image",
    "freedom",
    "bm3",
    "mmgcn",
    "iisan:text+image",
];

/// A catalog like tests/common's where every item has its image, or (`with_gaps`) where the
/// generator leaves a tenth of the items without one.
fn job(with_gaps: bool) -> String {
    let missing_image_rate = if with_gaps { 0.1 } else { 0.0 };
    format!(
        r#"name: base
data:
  synth: {{out: raw, items: 240, users: 300, categories: 6, seed: 5, image_size: 24, min_sequence: 6, max_sequence: 10, missing_image_rate: {missing_image_rate}}}
  source:
    amazon: {{reviews: raw/reviews.jsonl.gz, meta: raw/meta.jsonl.gz, images: raw/images}}
  k_core: 2
  negatives: 29
features:
  image: {{tiny_siglip: {{seed: 1, image_size: 24, patch_size: 8, hidden: 32}}}}
  text: {{tiny_bert: {{seed: 1, hidden: 24}}}}
model:
  sasrec: {{hidden: 16, blocks: 1, heads: 2, max_len: 8, dropout: 0.1}}
  freedom: {{dim: 16}}
  bm3: {{dim: 16}}
  mmgcn: {{dim: 16, latent: 16, layers: 2}}
  iisan: {{blocks: 2, bottleneck: 8}}
train:
  models: [{}]
  sasrec: {{epochs: 60, batch_size: 32, eval_every: 5, patience: 3, early_stopping_protocol: "sampled:29"}}
  graph: {{epochs: 60, batch_size: 256, eval_every: 5, patience: 3, early_stopping_protocol: "sampled:29"}}
  iisan: {{epochs: 60, batch_size: 32, lr: 0.001, eval_every: 5, patience: 3, early_stopping_protocol: "sampled:29"}}
eval:
  ks: [1, 5, 10]
  protocols: ["sampled:29"]
storage:
  root: store
telemetry:
  progress: off
"#,
        MODELS.iter().map(|m| format!("\"{m}\"")).collect::<Vec<_>>().join(", ")
    )
}

/// The `| model | protocol | users | hit@1 | hit@5 | hit@10 | ndcg@5 | ndcg@10 |` rows: model -> ndcg@10.
fn ndcg10_by_model(table: &str) -> Vec<(String, f64)> {
    table
        .lines()
        .filter(|l| l.contains("| sampled:29 |"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].to_string(), cells[8].parse().unwrap())
        })
        .collect()
}

#[test]
fn one_run_trains_and_tables_every_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("job.yaml"), job(false)).unwrap();
    let out = illmrec(d, &["run", "--job", "job.yaml"]).unwrap();
    let rows = ndcg10_by_model(&out);
    assert_eq!(rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), MODELS, "{out}");
    let ndcg = |m: &str| rows.iter().find(|r| r.0 == m).unwrap().1;
    // The catalog has a habit (categories follow each other) and items of a category share their
    // look and words: every learning model must beat the random floor.
    for m in &MODELS[2..] {
        assert!(ndcg(m) > ndcg("random") + 0.05, "{m}: ndcg@10 {} vs random {}\n{out}", ndcg(m), ndcg("random"));
    }
    // The cost columns: training seconds per epoch for the models trained by epochs, inference
    // seconds per user for all.
    for m in MODELS {
        let line = out.lines().find(|l| l.starts_with(&format!("| {m} | ")) && l.contains("(sampled:29)"));
        let line = line.unwrap_or_else(|| panic!("no cost row for {m}:\n{out}"));
        let train = line.split('|').nth(2).unwrap().trim();
        assert_eq!(train == "-", ["random", "pop"].contains(&m), "{line}");
    }
    // MoRec T+I reads the text (24-d) and image (32-d) features side by side.
    let store = Store::open(&d.join("store").display().to_string()).unwrap();
    let ckpt = illmrec::train::runs::load_latest(&store, "base-morec-text-image").unwrap().unwrap();
    let tf = TensorFile::parse(ckpt.file("model.safetensors").unwrap(), "morec").unwrap();
    assert_eq!(tf.f32("item_proj.w").unwrap().0, vec![24 + 32, 16]);
    // IISAN T+I: a side network per modality and one over both, two blocks each over layers 0, 1, 2
    // of the 2-layer encoders; their last states (24 + 32 + 56) fused to the model width.
    let ckpt = illmrec::train::runs::load_latest(&store, "base-iisan-text-image").unwrap().unwrap();
    let tf = TensorFile::parse(ckpt.file("model.safetensors").unwrap(), "iisan").unwrap();
    assert_eq!(tf.f32("san.inter.block2.down.w").unwrap().0, vec![24 + 32, 8]);
    assert_eq!(tf.f32("san.image.block1.up.w").unwrap().0, vec![8, 32]);
    assert_eq!(tf.f32("fuse.w").unwrap().0, vec![2 * (24 + 32), 16]);
    // A graph model recommends for a user of its snapshot, and refuses nothing it knows.
    let ds = illmrec::data::snapshot::load(&store, "base").unwrap();
    let user = ds.user_ids[0].clone();
    let recs = illmrec(d, &["recommend", "--job", "job.yaml", "--model", "freedom", "--user", &user, "--k", "3"]);
    assert_eq!(recs.unwrap().lines().filter(|l| l.trim_start().starts_with(char::is_numeric)).count(), 3);
}

#[test]
fn missing_and_non_finite_features_are_refused_naming_the_items() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // About a tenth of the items have no image.
    std::fs::write(d.join("job.yaml"), job(true)).unwrap();
    illmrec(d, &["synth", "--job", "job.yaml"]).unwrap();
    illmrec(d, &["prepare", "--job", "job.yaml"]).unwrap();
    illmrec(d, &["features", "--job", "job.yaml"]).unwrap();
    let err = illmrec(d, &["train", "--job", "job.yaml", "--model", "morec:image"]).unwrap_err();
    assert!(err.contains("morec:image: image features are missing for"), "{err}");
    assert!(err.contains("item(s): S"), "the error names the items: {err}");
    // The graph models mix the configured modalities, so the image gap stops them too.
    let err = illmrec(d, &["train", "--job", "job.yaml", "--model", "bm3"]).unwrap_err();
    assert!(err.contains("bm3: image features are missing for"), "{err}");
    let err = illmrec(d, &["train", "--job", "job.yaml", "--model", "iisan:text+image"]).unwrap_err();
    assert!(err.contains("iisan:text+image: image features are missing for"), "{err}");

    // Imported text features: one item short, then one NaN.
    let store = Store::open(&d.join("store").display().to_string()).unwrap();
    let ds = illmrec::data::snapshot::load(&store, "base").unwrap();
    let ids: Vec<String> = ds.items.iter().map(|i| i.id.clone()).collect();
    let write = |name: &str, ids: &[String], nan_at: Option<usize>| {
        let mut values = vec![0.5f32; ids.len() * 4];
        if let Some(r) = nan_at {
            values[r * 4 + 1] = f32::NAN;
        }
        let table = illmrec::features::FeatureTable { item_ids: ids.to_vec(), dim: 4, values };
        std::fs::write(d.join(name), table.to_bytes()).unwrap();
    };
    write("short.safetensors", &ids[1..], None);
    write("nan.safetensors", &ids, Some(3));
    let text_only = |file: &str| {
        job(true)
            .replace("  image: {tiny_siglip: {seed: 1, image_size: 24, patch_size: 8, hidden: 32}}\n", "")
            .replace("  text: {tiny_bert: {seed: 1, hidden: 24}}", &format!("  text: {{import: {{file: {file}}}}}"))
    };
    std::fs::write(d.join("short.yaml"), text_only("short.safetensors")).unwrap();
    illmrec(d, &["features", "--job", "short.yaml"]).unwrap();
    let err = illmrec(d, &["train", "--job", "short.yaml", "--model", "freedom"]).unwrap_err();
    assert!(err.contains(&format!("text features are missing for 1 item(s), e.g. {}", ids[0])), "{err}");
    // IISAN reads the encoder's layers, which a table does not have.
    let err = illmrec(d, &["train", "--job", "short.yaml", "--model", "iisan:text"]).unwrap_err();
    assert!(err.contains("per-layer text states need an encoder to run"), "{err}");
    std::fs::write(d.join("nan.yaml"), text_only("nan.safetensors")).unwrap();
    let err = illmrec(d, &["features", "--job", "nan.yaml"]).unwrap_err();
    assert!(err.contains(&format!("non-finite value for item `{}`", ids[3])), "{err}");
}
