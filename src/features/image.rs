//! Image features: the pooled output of a SigLIP vision tower (candle-transformers), from a Hugging
//! Face directory or tiny and random from a seed. Preprocessing as SigLIP's: resize to the model's
//! size (bicubic), scale to [0, 1], normalise with mean 0.5 and std 0.5.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::siglip::{VisionConfig, VisionModel};

use super::config::TinySiglipConfig;
use super::{hash_dir_files, load_err, FeatureError};

pub struct ImageEncoder {
    model: VisionModel,
    image_size: usize,
    dim: usize,
    /// Names the cache: the same id means the same features for the same image bytes.
    pub id: String,
    device: Device,
}

/// The vision part of a SigLIP `config.json` (a full SigLIP config nests it in `vision_config`).
fn vision_config(raw: &serde_json::Value) -> serde_json::Value {
    raw.get("vision_config").cloned().unwrap_or_else(|| raw.clone())
}

impl ImageEncoder {
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self, FeatureError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| load_err(&config_path, e))?;
        let raw: serde_json::Value = serde_json::from_str(&text).map_err(|e| load_err(&config_path, e))?;
        let cfg: VisionConfig = serde_json::from_value(vision_config(&raw)).map_err(|e| load_err(&config_path, e))?;
        let weights = dir.join("model.safetensors");
        // SAFETY: mapped read-only; the file is not modified while the encoder lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .map_err(|e| load_err(&weights, e))?;
        let model = VisionModel::new(&cfg, true, vb.pp("vision_model")).map_err(|e| load_err(&weights, e))?;
        Ok(Self {
            model,
            image_size: cfg.image_size,
            dim: cfg.hidden_size,
            id: siglip_id(dir)?,
            device: device.clone(),
        })
    }

    pub fn tiny(cfg: &TinySiglipConfig, device: &Device) -> Result<Self, FeatureError> {
        Self::tiny_with_weights(cfg, device).map(|(e, _)| e)
    }

    fn tiny_with_weights(
        cfg: &TinySiglipConfig,
        device: &Device,
    ) -> Result<(Self, std::sync::Arc<super::seeded::SeededWeights>), FeatureError> {
        let vcfg = tiny_vision_config(cfg);
        let (vb, weights) = super::seeded::var_builder(cfg.seed, device);
        let model = VisionModel::new(&serde_json::from_value(vcfg)?, true, vb.pp("vision_model"))?;
        let id = tiny_siglip_id(cfg);
        Ok((Self { model, image_size: cfg.image_size, dim: cfg.hidden, id, device: device.clone() }, weights))
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Features `[images.len() * dim]`, row-major.
    pub fn encode(&self, images: &[image::DynamicImage]) -> Result<Vec<f32>, FeatureError> {
        let s = self.image_size;
        let mut pixels = Vec::with_capacity(images.len() * 3 * s * s);
        for img in images {
            pixels.extend(preprocess(img, s));
        }
        let x = Tensor::from_vec(pixels, (images.len(), 3, s, s), &self.device)?;
        let out = self.model.forward(&x)?;
        Ok(out.reshape((images.len(), self.dim))?.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// The cache id of a SigLIP directory (see `hash_dir_files`).
pub fn siglip_id(dir: &Path) -> Result<String, FeatureError> {
    Ok(format!("siglip-{}", hash_dir_files(dir, &["config.json", "model.safetensors"])?))
}

pub fn tiny_siglip_id(cfg: &TinySiglipConfig) -> String {
    format!("tiny-siglip-{}", super::hash_json(cfg))
}

fn tiny_vision_config(cfg: &TinySiglipConfig) -> serde_json::Value {
    serde_json::json!({
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.hidden * 2,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": 4,
        "num_channels": 3,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    })
}

/// Writes the tiny SigLIP as a Hugging Face directory that `ImageEncoder::from_dir` loads.
pub fn save_tiny_siglip(cfg: &TinySiglipConfig, dir: &Path) -> Result<(), FeatureError> {
    std::fs::create_dir_all(dir).map_err(|e| load_err(dir, e))?;
    let (_, weights) = ImageEncoder::tiny_with_weights(cfg, &Device::Cpu)?;
    let config = serde_json::json!({"model_type": "siglip", "vision_config": tiny_vision_config(cfg)});
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?).map_err(|e| load_err(dir, e))?;
    weights.save(dir)?;
    Ok(())
}

/// `[3, size, size]` channel-major pixels: bicubic resize, x / 255, then (x - 0.5) / 0.5.
pub fn preprocess(img: &image::DynamicImage, size: usize) -> Vec<f32> {
    let rgb = img.to_rgb8();
    let resized = image::imageops::resize(&rgb, size as u32, size as u32, image::imageops::FilterType::CatmullRom);
    let mut out = vec![0f32; 3 * size * size];
    for (x, y, p) in resized.enumerate_pixels() {
        for c in 0..3 {
            out[c * size * size + y as usize * size + x as usize] = (p[c] as f32 / 255.0 - 0.5) / 0.5;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocess_scales_to_minus_one_one_channel_major() {
        let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(4, 4, image::Rgb([255, 0, 51])));
        let p = preprocess(&img, 2);
        assert_eq!(p.len(), 12);
        assert!(p[..4].iter().all(|&v| (v - 1.0).abs() < 1e-6));
        assert!(p[4..8].iter().all(|&v| (v + 1.0).abs() < 1e-6));
        assert!(p[8..].iter().all(|&v| (v + 0.6).abs() < 1e-6));
    }

    #[test]
    fn tiny_siglip_saved_as_a_directory_gives_the_same_features_and_separates_colours() {
        let cfg = TinySiglipConfig::default();
        let tiny = ImageEncoder::tiny(&cfg, &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        save_tiny_siglip(&cfg, dir.path()).unwrap();
        let loaded = ImageEncoder::from_dir(dir.path(), &Device::Cpu).unwrap();
        let solid = |c: [u8; 3]| image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(20, 20, image::Rgb(c)));
        let imgs = [solid([250, 10, 10]), solid([245, 20, 15]), solid([10, 10, 250])];
        let a = tiny.encode(&imgs).unwrap();
        assert_eq!(a, loaded.encode(&imgs).unwrap());
        assert_eq!(a.len(), 3 * cfg.hidden);
        // Even random weights keep similar images closer than different ones.
        let d = |i: usize, j: usize| -> f32 {
            (0..cfg.hidden).map(|k| (a[i * cfg.hidden + k] - a[j * cfg.hidden + k]).powi(2)).sum()
        };
        assert!(d(0, 1) < d(0, 2), "red-red {} vs red-blue {}", d(0, 1), d(0, 2));
        assert_ne!(tiny.id, ImageEncoder::tiny(&TinySiglipConfig { seed: 2, ..cfg }, &Device::Cpu).unwrap().id);
    }
}
