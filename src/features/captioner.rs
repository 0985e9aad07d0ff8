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

    pub fn load(dir: &Path) -> Result<Self, FeatureError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| load_err(&config_path, e))?;
        let raw: serde_json::Value = serde_json::from_str(&text).map_err(|e| load_err(&config_path, e))?;
        let cfg: blip::Config = serde_json::from_value(raw.clone()).map_err(|e| load_err(&config_path, e))?;
        // BLIP's decoder starts from [DEC] (30522 in bert-base-uncased's vocabulary) and stops at [SEP].
        let id = |k: &str, default: u32| {
            raw["text_config"].get(k).and_then(serde_json::Value::as_u64).map_or(default, |v| v as u32)
        };
        let device = Device::Cpu;
        let weights = dir.join("model.safetensors");
        // SAFETY: mapped read-only; the file is not modified while the model lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &device) }
            .map_err(|e| load_err(&weights, e))?;
        let model = blip::BlipForConditionalGeneration::new(&cfg, vb).map_err(|e| load_err(&weights, e))?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| load_err(&tok_path, e))?;
        Ok(Self {
            model,
            tokenizer,
            image_size: cfg.vision_config.image_size,
            bos: id("bos_token_id", 30522),
            sep: id("sep_token_id", 102),
            device,
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::features::seeded::var_builder;

    /// Writes a tiny BLIP with seeded random weights as a Hugging Face directory: the architecture of
    /// blip-image-captioning-base at a few dozen dimensions.
    pub fn tiny_blip_dir(dir: &Path) {
        let tokenizer = crate::model::llm::tiny::tokenizer(512).unwrap();
        let vocab = tokenizer.get_vocab_size(true);
        let cfg = serde_json::json!({
            "text_config": {
                "vocab_size": vocab, "hidden_size": 32, "encoder_hidden_size": 32, "intermediate_size": 64,
                "projection_dim": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
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
        let parsed: blip::Config = serde_json::from_value(cfg.clone()).unwrap();
        let (vb, weights) = var_builder(3, &Device::Cpu);
        blip::BlipForConditionalGeneration::new(&parsed, vb).unwrap();
        weights.save(dir).unwrap();
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        tokenizer.save(dir.join("tokenizer.json"), false).unwrap();
    }

    #[test]
    fn a_tiny_blip_directory_loads_and_captions_deterministically() {
        let dir = tempfile::tempdir().unwrap();
        tiny_blip_dir(dir.path());
        let mut blip = Blip::load(dir.path()).unwrap();
        let red = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(40, 30, image::Rgb([250, 10, 10])));
        let blue = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(40, 30, image::Rgb([10, 10, 250])));
        let a = blip.caption(&red, "a picture of", 6).unwrap();
        assert!(a.starts_with("a picture of"), "{a:?}");
        assert_eq!(a, blip.caption(&red, "a picture of", 6).unwrap(), "greedy captions repeat");
        // Random weights say nothing true: this checks the code path (loading, the vision tower, the
        // decoder with its cache), not the words.
        assert!(blip.caption(&blue, "a picture of", 6).unwrap().starts_with("a picture of"));
        let id = Blip::cache_id(dir.path(), "a picture of", 6).unwrap();
        assert_ne!(id, Blip::cache_id(dir.path(), "a photo of", 6).unwrap());
    }
}
