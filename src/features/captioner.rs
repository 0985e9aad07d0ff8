//! BLIP image captioning (candle-transformers' `blip`) from a Hugging Face directory: the picture is
//! resized to the model's square input and normalised with CLIP's statistics, the vision tower's
//! states condition the text decoder, and the caption is decoded greedily from `[DEC]` and the
//! prompt until `[SEP]`.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::blip;
use image::DynamicImage;
use tokenizers::Tokenizer;

use super::{hash_dir_files, load_err, FeatureError};

const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

pub struct Blip {
    model: blip::BlipForConditionalGeneration,
    tokenizer: Tokenizer,
    image_size: usize,
    bos: u32,
    sep: u32,
    device: Device,
}

impl Blip {
    /// The cache id of captions by the model in `dir` with this prompt and length limit.
    pub fn cache_id(dir: &Path, prompt: &str, max_tokens: usize) -> Result<String, FeatureError> {
        let model = hash_dir_files(dir, &["config.json", "model.safetensors", "tokenizer.json"])?;
        Ok(format!("captions-blip-{model}-{}", super::hash_json(&(prompt, max_tokens))))
    }

    /// The cache id of captions by the tiny BLIP of `seed`.
    pub fn tiny_cache_id(seed: u64, prompt: &str, max_tokens: usize) -> String {
        format!("captions-tiny-blip-{}", super::hash_json(&(seed, prompt, max_tokens)))
    }

    pub fn load(dir: &Path) -> Result<Self, FeatureError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| load_err(&config_path, e))?;
        let raw: serde_json::Value = serde_json::from_str(&text).map_err(|e| load_err(&config_path, e))?;
        let weights = dir.join("model.safetensors");
        // SAFETY: mapped read-only; the file is not modified while the model lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &Device::Cpu) }
            .map_err(|e| load_err(&weights, e))?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| load_err(&tok_path, e))?;
        Self::build(&raw, vb, tokenizer).map_err(|e| load_err(dir, e))
    }

    /// BLIP's architecture at a few dozen dimensions with seeded random weights: for tests and code-path
    /// checks, its captions say nothing true about a picture.
    pub fn tiny(seed: u64) -> Result<Self, FeatureError> {
        let (raw, tokenizer) = tiny_config()?;
        let (vb, _) = super::seeded_var_builder(seed, &Device::Cpu);
        Self::build(&raw, vb, tokenizer).map_err(|e| FeatureError::Invalid(format!("tiny BLIP: {e}")))
    }

    fn build(raw: &serde_json::Value, vb: VarBuilder, tokenizer: Tokenizer) -> Result<Self, String> {
        let cfg: blip::Config = serde_json::from_value(raw.clone()).map_err(|e| format!("config.json: {e}"))?;
        // BLIP's decoder starts from [DEC] (30522 in bert-base-uncased's vocabulary) and stops at [SEP].
        let id = |k: &str, default: u32| {
            raw["text_config"].get(k).and_then(serde_json::Value::as_u64).map_or(default, |v| v as u32)
        };
        let model = blip::BlipForConditionalGeneration::new(&cfg, vb).map_err(|e| e.to_string())?;
        Ok(Self {
            model,
            tokenizer,
            image_size: cfg.vision_config.image_size,
            bos: id("bos_token_id", 30522),
            sep: id("sep_token_id", 102),
            device: Device::Cpu,
        })
    }

    /// `[1, 3, size, size]`: resized (bicubic), scaled to [0, 1], normalised per channel.
    fn pixels(&self, img: &DynamicImage) -> candle_core::Result<Tensor> {
        let s = self.image_size as u32;
        let rgb = img.resize_exact(s, s, image::imageops::FilterType::CatmullRom).to_rgb8();
        let data = Tensor::from_vec(rgb.into_raw(), (s as usize, s as usize, 3), &self.device)?
            .permute((2, 0, 1))?
            .to_dtype(DType::F32)?
            .affine(1.0 / 255.0, 0.0)?;
        let mean = Tensor::new(&MEAN, &self.device)?.reshape((3, 1, 1))?;
        let std = Tensor::new(&STD, &self.device)?.reshape((3, 1, 1))?;
        data.broadcast_sub(&mean)?.broadcast_div(&std)?.unsqueeze(0)
    }

    /// The caption of one picture: the prompt and what the model adds, greedy, at most `max_tokens`.
    pub fn caption(&mut self, img: &DynamicImage, prompt: &str, max_tokens: usize) -> Result<String, FeatureError> {
        let tok = |e: tokenizers::Error| FeatureError::Invalid(format!("BLIP tokenizer: {e}"));
        let image_embeds = self.model.vision_model().forward(&self.pixels(img)?)?;
        self.model.reset_kv_cache();
        let mut ids = vec![self.bos];
        ids.extend(self.tokenizer.encode(prompt, false).map_err(tok)?.get_ids());
        let mut feed = ids.clone();
        for _ in 0..max_tokens {
            let input = Tensor::new(feed.as_slice(), &self.device)?.unsqueeze(0)?;
            let logits = self.model.text_decoder().forward(&input, &image_embeds)?;
            let last = logits.squeeze(0)?.get(feed.len() - 1)?;
            let next = last.argmax(0)?.to_scalar::<u32>()?;
            if next == self.sep {
                break;
            }
            ids.push(next);
            feed = vec![next];
        }
        let text = self.tokenizer.decode(&ids[1..], true).map_err(tok)?;
        Ok(text.split_whitespace().collect::<Vec<_>>().join(" "))
    }
}

/// The tiny BLIP's config.json and tokenizer (the tiny LLM's byte-level BPE).
fn tiny_config() -> Result<(serde_json::Value, Tokenizer), FeatureError> {
    let tokenizer =
        crate::model::llm::tiny::tokenizer(512).map_err(|e| FeatureError::Invalid(format!("tiny BLIP: {e}")))?;
    let cfg = serde_json::json!({
        "text_config": {
            "vocab_size": tokenizer.get_vocab_size(true), "hidden_size": 32, "encoder_hidden_size": 32,
            "intermediate_size": 64, "projection_dim": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "max_position_embeddings": 64, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
            "is_decoder": true, "bos_token_id": 1, "sep_token_id": 2
        },
        "vision_config": {
            "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "hidden_act": "gelu",
            "layer_norm_eps": 1e-5
        },
        "projection_dim": 32,
        "image_text_hidden_size": 32
    });
    Ok((cfg, tokenizer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_blip_written_as_a_directory_loads_and_captions_like_the_one_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        // The Hugging Face layout: config.json, model.safetensors, tokenizer.json.
        let (raw, tokenizer) = tiny_config().unwrap();
        let (vb, weights) = crate::features::seeded_var_builder(3, &Device::Cpu);
        Blip::build(&raw, vb, tokenizer.clone()).unwrap();
        weights.save(dir.path()).unwrap();
        std::fs::write(dir.path().join("config.json"), raw.to_string()).unwrap();
        tokenizer.save(dir.path().join("tokenizer.json"), false).unwrap();
        let mut from_dir = Blip::load(dir.path()).unwrap();
        let mut in_memory = Blip::tiny(3).unwrap();
        let red = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(40, 30, image::Rgb([250, 10, 10])));
        let a = from_dir.caption(&red, "a picture of", 6).unwrap();
        assert!(a.starts_with("a picture of"), "{a:?}");
        assert_eq!(a, in_memory.caption(&red, "a picture of", 6).unwrap());
        assert_eq!(a, from_dir.caption(&red, "a picture of", 6).unwrap(), "greedy captions repeat");
        let id = Blip::cache_id(dir.path(), "a picture of", 6).unwrap();
        assert_ne!(id, Blip::cache_id(dir.path(), "a photo of", 6).unwrap());
    }
}
