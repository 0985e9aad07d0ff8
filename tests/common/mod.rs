//! Helpers shared by the integration tests that run small jobs and compare trained runs.

use illmrec::store::Store;
use illmrec::tensorfile::TensorFile;
use illmrec::train::runs;

/// The data, features and model sections of the small jobs the integration tests run: a synthetic
/// image catalog (written to `raw/` by `illmrec synth`), tiny seeded encoders, the tiny Llama.
/// `extra_data` adds keys to the `data` section (one `key: value` per line, indented by two).
pub fn tiny_sections(extra_data: &str) -> String {
    format!(
        r#"data:
  synth: {{out: raw, items: 240, users: 160, categories: 6, seed: 5, image_size: 24, min_sequence: 6, max_sequence: 10}}
  source:
    amazon: {{reviews: raw/reviews.jsonl.gz, meta: raw/meta.jsonl.gz, images: raw/images}}
  k_core: 2
  negatives: 29
{extra_data}features:
  image: {{tiny_siglip: {{seed: 1, image_size: 24, patch_size: 8, hidden: 32}}}}
  text: {{tiny_bert: {{seed: 1, hidden: 32}}}}
model:
  llm: {{tiny: {{seed: 1, layers: 2, hidden: 64}}}}
  illmrec: {{retrieval: [image, text], adaptor_hidden: 32, head_dim: 32, max_history: 6}}
"#
    )
}

/// Every tensor of a run's LATEST weights, by name, read through the storage API (so the same code
/// reads a local and an S3 root).
pub fn latest_weights(store: &Store, run_id: &str) -> Vec<(String, Vec<f32>)> {
    let ckpt = runs::load_latest(store, run_id).unwrap().expect("the run has a LATEST checkpoint");
    let tf = TensorFile::parse(ckpt.file("weights.safetensors").unwrap(), "weights").unwrap();
    tf.names().into_iter().map(|n| (n.clone(), tf.f32(&n).unwrap().1)).collect()
}

/// Largest difference between two runs' parameters, relative to each tensor's largest magnitude
/// (an element-wise ratio is meaningless for weights that sit near zero), and where it is.
pub fn largest_difference(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> (f32, String) {
    assert_eq!(a.len(), b.len(), "the runs have different tensors");
    let mut worst = (0f32, String::new());
    for ((name, x), (name_b, y)) in a.iter().zip(b) {
        assert_eq!(name, name_b);
        let scale = x.iter().chain(y).fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
        for (i, (p, q)) in x.iter().zip(y).enumerate() {
            let rel = (p - q).abs() / scale;
            if rel > worst.0 {
                worst = (rel, format!("{name}[{i}]: {p} vs {q} (tensor scale {scale})"));
            }
        }
    }
    worst
}
