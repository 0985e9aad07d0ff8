//! The real small model for CPUs: SmolLM2-135M-Instruct as a Q4_1 GGUF (fetched by
//! scripts/fetch-assets.sh smollm2), dequantized and run through illmrec's own Llama forward.

use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor, D};
use candle_transformers::models::quantized_llama;
use illmrec::model::llm::{Llm, LlmSource};

mod assets;

fn gguf() -> PathBuf {
    assets::asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2")
}

#[test]
fn smollm2_gguf_loads_tokenizes_and_completes_a_fact() {
    let llm = Llm::load(&LlmSource::Gguf { file: gguf() }, DType::F32, &Device::Cpu).unwrap();
    let cfg = &llm.model.cfg;
    assert_eq!((cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.kv_heads()), (576, 30, 9, 3));
    assert_eq!((cfg.vocab_size, llm.bos, llm.eos), (49152, Some(1), 2));

    // The tokenizer built from the GGUF metadata round-trips, splits digits, keeps control tokens whole
    // and adds no prefix space.
    let text = "Title: The Matrix (1999), Visual representation: <|im_start|>";
    let ids = llm.encode(text).unwrap();
    assert_eq!(llm.decode(&ids).unwrap(), text);
    assert_eq!(*ids.last().unwrap(), 1, "<|im_start|> is one control token");
    assert_eq!(llm.encode("1999").unwrap().len(), 4);
    assert_eq!(llm.encode("Hello").unwrap().len(), 1);

    // Greedy decoding through illmrec's forward (dequantized weights, interleaved RoPE, grouped-query
    // attention) agrees token for token with candle's own quantized Llama on the same file.
    let prompt =
        "<|im_start|>user\nWhat is the capital of France? Answer with one word.<|im_end|>\n<|im_start|>assistant\n";
    let prompt_ids = llm.encode(prompt).unwrap();
    let ours = greedy(&prompt_ids, 6, |ids| {
        let x = llm.embed_ids(ids.to_vec(), 1).unwrap();
        let h = llm.model.forward_embeds(&x).unwrap();
        llm.model.logits(&h.narrow(1, ids.len() - 1, 1).unwrap()).unwrap()
    });
    let mut file = std::fs::File::open(gguf()).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut reference = quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
    let theirs = greedy(&prompt_ids, 6, |ids| {
        let x = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        reference.forward(&x, 0).unwrap()
    });
    let text = llm.decode(&ours).unwrap();
    assert_eq!(ours, theirs, "ours {text:?} vs candle's quantized model {:?}", llm.decode(&theirs).unwrap());
    assert!(text.contains("Paris"), "{text:?}");
}

/// `steps` greedy tokens after `prompt`, recomputing the whole sequence each step.
fn greedy(prompt: &[u32], steps: usize, mut logits: impl FnMut(&[u32]) -> Tensor) -> Vec<u32> {
    let mut ids = prompt.to_vec();
    for _ in 0..steps {
        let next = logits(&ids).flatten_all().unwrap().argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap();
        ids.push(next);
    }
    ids[prompt.len()..].to_vec()
}
