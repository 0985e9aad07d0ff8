//! Real encoders on real weights: all-MiniLM-L6-v2 (fetched by scripts/fetch-assets.sh minilm)
//! through candle's BERT and illmrec's pooling, against values from an independent float64 numpy
//! forward (scripts/reference/minilm_reference.py).

use std::path::PathBuf;

use candle_core::Device;
use illmrec::features::text::TextEncoder;

mod assets;

fn minilm() -> PathBuf {
    let weights = assets::asset("all-MiniLM-L6-v2/model.safetensors", "minilm");
    weights.parent().expect("a file has a folder").to_path_buf()
}

#[test]
fn minilm_sentence_embeddings_match_an_independent_forward() {
    let enc = TextEncoder::from_dir(&minilm(), &Device::Cpu).unwrap();
    assert_eq!(enc.dim(), 384);
    let texts: Vec<String> =
        ["Title: Classic red lamp. Brand: Kalo.", "A bright desk light", "Quarterly stock market report"]
            .map(String::from)
            .to_vec();
    // Batched together, so the shorter texts are padded: padding must not change them.
    let e = enc.encode(&texts).unwrap();
    let reference = [
        [-0.066669f32, 0.051292, -0.056225, 0.003042],
        [-0.019274, 0.05571, 0.019154, 0.007871],
        [0.006826, 0.020266, -0.036397, 0.05931],
    ];
    for (row, want) in reference.iter().enumerate() {
        for (k, w) in want.iter().enumerate() {
            let got = e[row * 384 + k];
            assert!((got - w).abs() < 2e-5, "text {row} dim {k}: {got} vs reference {w}");
        }
    }
    let cos = |a: usize, b: usize| (0..384).map(|k| e[a * 384 + k] * e[b * 384 + k]).sum::<f32>();
    assert!((cos(0, 1) - 0.322629).abs() < 1e-4 && (cos(0, 2) - 0.032253).abs() < 1e-4, "{} {}", cos(0, 1), cos(0, 2));
}
