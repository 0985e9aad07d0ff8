//! A vision-language model in process: moondream2 (candle-transformers' `moondream`, a SigLIP-style
//! vision encoder whose patch states are projected into a Phi decoder) from a Hugging Face directory:
//! `model.safetensors`, `tokenizer.json`, and optionally `config.json` with `phi_config` and
//! `vision_config` (without one, moondream2's own architecture). Each history image is encoded and
//! its states placed after the BOS token, in order, before the prompt (one image, or one per item);
//! the answer is decoded greedily under the same list grammar as the text model, one request at a
//! time (the decoder keeps one cache).

use std::cell::RefCell;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::moondream;
use tokenizers::Tokenizer;

use super::{Backend, BackendError, Image, Reply, Request};
use crate::lvlm::grammar::{self, ListGrammar, OPENING};

/// Side of a moondream patch.
const PATCH: usize = 14;

pub struct Moondream {
    model: RefCell<moondream::Model>,
    tokenizer: Tokenizer,
    image_size: usize,
    bos: u32,
    list_tokens: Vec<(u32, String)>,
    identity: String,
}

fn fatal(e: impl std::fmt::Display) -> BackendError {
    BackendError::Fatal(e.to_string())
}

fn failed(e: impl std::fmt::Display) -> BackendError {
    BackendError::Request(e.to_string())
}

impl Moondream {
    pub fn load(dir: &Path) -> Result<Self, BackendError> {
        let at = |p: &Path, e: &dyn std::fmt::Display| fatal(format!("{}: {e}", p.display()));
        let config_path = dir.join("config.json");
        let raw: Option<serde_json::Value> = match std::fs::read_to_string(&config_path) {
            Ok(text) => Some(serde_json::from_str(&text).map_err(|e| at(&config_path, &e))?),
            Err(_) => None,
        };
        let weights = dir.join("model.safetensors");
        // SAFETY: mapped read-only; the file is not modified while the model lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &Device::Cpu) }
            .map_err(|e| at(&weights, &e))?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| at(&tok_path, &e))?;
        let files = ["config.json", "model.safetensors", "tokenizer.json"];
        let present: Vec<&str> = files.iter().copied().filter(|f| dir.join(f).exists()).collect();
        let hash = crate::features::hash_dir_files(dir, &present).map_err(fatal)?;
        Self::build(raw.as_ref(), vb, tokenizer, format!("moondream {hash}")).map_err(|e| at(dir, &e))
    }

    /// moondream2's architecture with a Phi decoder a few dozen wide and seeded random weights (the
    /// vision tower keeps moondream's fixed 1152-wide patch embedding): for tests and code-path checks,
    /// its answers say nothing about what a real moondream2 would answer.
    pub fn tiny(seed: u64) -> Result<Self, BackendError> {
        let (raw, tokenizer) = tiny_config()?;
        let (vb, _) = crate::features::seeded_var_builder(seed, &Device::Cpu);
        Self::build(Some(&raw), vb, tokenizer, format!("tiny moondream seed {seed}")).map_err(fatal)
    }

    /// The model from a config (moondream2's own without one), weights and tokenizer.
    fn build(
        raw: Option<&serde_json::Value>,
        vb: VarBuilder,
        tokenizer: Tokenizer,
        name: String,
    ) -> Result<Self, String> {
        let (cfg, embed_len) = match raw {
            Some(v) if v.get("phi_config").is_some() => (
                serde_json::from_value::<moondream::Config>(v.clone()).map_err(|e| format!("config.json: {e}"))?,
                v["vision_config"]["embed_len"].as_u64().unwrap_or(729) as usize,
            ),
            _ => (moondream::Config::v2(), 729),
        };
        let side = (embed_len as f64).sqrt().round() as usize;
        if side * side != embed_len {
            return Err(format!("vision_config.embed_len {embed_len} is not a square number of patches"));
        }
        let model = moondream::Model::new(&cfg, vb).map_err(|e| e.to_string())?;
        let bos = raw
            .and_then(|v| v.get("bos_token_id").and_then(serde_json::Value::as_u64))
            .map(|v| v as u32)
            .or_else(|| tokenizer.token_to_id("<|endoftext|>"))
            .ok_or("no <|endoftext|> token and no bos_token_id in config.json")?;
        let vocab = tokenizer.get_vocab_size(true) as u32;
        let texts = (0..vocab).filter_map(|id| tokenizer.decode(&[id], false).ok().map(|t| (id, t)));
        let list_tokens = grammar::list_tokens(texts);
        let identity = format!("{name} greedy list-constrained");
        Ok(Self { model: RefCell::new(model), tokenizer, image_size: side * PATCH, bos, list_tokens, identity })
    }

    /// `[1, 3, size, size]` in [-1, 1].
    fn pixels(&self, img: &Image) -> Result<Tensor, BackendError> {
        let decoded = image::load_from_memory(&img.png).map_err(failed)?;
        let s = self.image_size as u32;
        let rgb = decoded.resize_exact(s, s, image::imageops::FilterType::Triangle).to_rgb8();
        let t = Tensor::from_vec(rgb.into_raw(), (s as usize, s as usize, 3), &Device::Cpu)
            .and_then(|t| t.permute((2, 0, 1))?.to_dtype(DType::F32)?.affine(2.0 / 255.0, -1.0)?.unsqueeze(0))
            .map_err(fatal)?;
        Ok(t)
    }

    fn answer_one(&self, req: &Request) -> Result<Reply, BackendError> {
        let started = std::time::Instant::now();
        let text = format!("\n\nQuestion: {}\n\nAnswer: {OPENING}", req.prompt);
        let ids = self.tokenizer.encode(text.as_str(), false).map_err(failed)?.get_ids().to_vec();
        let mut model = self.model.borrow_mut();
        let mut embeds = Vec::new();
        for img in &req.images {
            embeds.push(model.vision_encoder.forward(&self.pixels(img)?).map_err(fatal)?);
        }
        model.text_model.clear_kv_cache();
        let bos = Tensor::new(&[self.bos], &Device::Cpu).and_then(|t| t.unsqueeze(0)).map_err(fatal)?;
        let prompt = Tensor::new(ids.as_slice(), &Device::Cpu).and_then(|t| t.unsqueeze(0)).map_err(fatal)?;
        let mut logits = if embeds.is_empty() {
            model.text_model.forward(&Tensor::cat(&[&bos, &prompt], 1).map_err(fatal)?)
        } else {
            let images = Tensor::cat(&embeds, 1).map_err(fatal)?;
            model.text_model.forward_with_img(&bos, &prompt, &images)
        }
        .map_err(fatal)?;
        let grammar = ListGrammar::new(req.labels, req.list_length);
        let mut list = String::new();
        let mut generated = 0;
        while generated < req.max_tokens && !list.ends_with(']') {
            let scores = logits.flatten_all().and_then(|l| l.to_vec1::<f32>()).map_err(fatal)?;
            let choices = grammar::allowed(&grammar, &list, &self.list_tokens);
            let Some(&(k, _)) = choices.iter().max_by(|a, b| {
                let score = |k: usize| scores.get(self.list_tokens[k].0 as usize).copied().unwrap_or(f32::NEG_INFINITY);
                score(a.0).total_cmp(&score(b.0))
            }) else {
                break;
            };
            let (id, piece) = &self.list_tokens[k];
            list.push_str(piece);
            generated += 1;
            if !list.ends_with(']') {
                let next = Tensor::new(&[*id], &Device::Cpu).and_then(|t| t.unsqueeze(0)).map_err(fatal)?;
                logits = model.text_model.forward(&next).map_err(fatal)?;
            }
        }
        let close = if list.ends_with(']') { "}" } else { "" };
        Ok(Reply {
            text: format!("{OPENING}{list}{close}"),
            prompt_tokens: 1 + ids.len() + embeds.iter().map(|e| e.dim(1).unwrap_or(0)).sum::<usize>(),
            completion_tokens: generated,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

impl Backend for Moondream {
    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn sees_images(&self) -> bool {
        true
    }

    fn answer(
        &self,
        requests: &[Request],
        done: &mut dyn FnMut(usize, Result<Reply, BackendError>),
    ) -> Result<(), BackendError> {
        for (i, r) in requests.iter().enumerate() {
            match self.answer_one(r) {
                Err(BackendError::Fatal(e)) => return Err(BackendError::Fatal(e)),
                other => done(i, other),
            }
        }
        Ok(())
    }
}

/// The tiny moondream2's config.json (with its BOS id) and tokenizer (the tiny LLM's byte-level BPE).
fn tiny_config() -> Result<(serde_json::Value, Tokenizer), BackendError> {
    let tokenizer = crate::model::llm::tiny::tokenizer(512).map_err(fatal)?;
    let cfg = serde_json::json!({
        "phi_config": {
            "vocab_size": tokenizer.get_vocab_size(true), "n_positions": 512, "n_embd": 64, "n_layer": 2,
            "n_inner": null, "n_head": 4, "rotary_dim": 16, "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5, "tie_word_embeddings": false, "pad_vocab_size_multiple": 64
        },
        "vision_config": {
            "image_embedding_dim": 1152, "model_dim": 64, "hidden_dim": 64, "hidden_features": 32,
            "embed_len": 4, "embed_dim": 1152, "num_blocks": 1, "num_heads": 2, "act": "gelu_pytorch_tanh"
        },
        "bos_token_id": 1
    });
    Ok((cfg, tokenizer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lvlm::answer;

    /// The tiny moondream written as a Hugging Face directory (config.json, model.safetensors,
    /// tokenizer.json) and loaded back through `load`.
    fn from_dir(seed: u64) -> Moondream {
        let dir = tempfile::tempdir().unwrap();
        let (raw, tokenizer) = tiny_config().unwrap();
        let (vb, weights) = crate::features::seeded_var_builder(seed, &Device::Cpu);
        Moondream::build(Some(&raw), vb, tokenizer.clone(), "x".into()).unwrap();
        weights.save(dir.path()).unwrap();
        std::fs::write(dir.path().join("config.json"), raw.to_string()).unwrap();
        tokenizer.save(dir.path().join("tokenizer.json"), false).unwrap();
        Moondream::load(dir.path()).unwrap()
    }

    #[test]
    fn a_tiny_moondream_reads_one_or_several_images_and_answers_a_parsable_list() {
        let m = from_dir(5);
        assert_eq!(m.image_size, 28);
        let png =
            |rgb: [u8; 3]| crate::lvlm::images::png(&image::RgbImage::from_pixel(30, 20, image::Rgb(rgb))).unwrap();
        let titles: Vec<String> = (1..=6).map(|i| format!("item {i}")).collect();
        let ask = |images: Vec<Image>| Request {
            prompt: format!("Rank: {}", titles.join(", ")),
            images,
            labels: 6,
            list_length: 3,
            max_tokens: 40,
        };
        let requests = vec![ask(vec![png([255, 0, 0])]), ask(vec![png([255, 0, 0]), png([0, 0, 255])]), ask(vec![])];
        let mut replies = vec![None, None, None];
        m.answer(&requests, &mut |i, r| replies[i] = Some(r.unwrap())).unwrap();
        let replies: Vec<Reply> = replies.into_iter().map(Option::unwrap).collect();
        for r in &replies {
            let p = answer::parse(&r.text, &titles).unwrap();
            assert_eq!((p.ranking.len(), p.hallucinated, p.duplicates), (3, 0, 0), "{}", r.text);
        }
        // Each image adds its patches to what the decoder reads.
        assert_eq!(replies[1].prompt_tokens - replies[0].prompt_tokens, 4);
        assert_eq!(replies[0].prompt_tokens - replies[2].prompt_tokens, 4);
        // The same weights in memory answer the same.
        let mut again = vec![None, None, None];
        Moondream::tiny(5).unwrap().answer(&requests, &mut |i, r| again[i] = Some(r.unwrap().text)).unwrap();
        for (r, t) in replies.iter().zip(again) {
            assert_eq!(Some(r.text.clone()), t);
        }
    }
}
