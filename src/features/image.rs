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
    /// The weights and config the model was built from: `layered` builds shallower copies.
    vb: VarBuilder<'static>,
    cfg: VisionConfig,
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
        let vb = vb.pp("vision_model");
        let model = VisionModel::new(&cfg, true, vb.clone()).map_err(|e| load_err(&weights, e))?;
        Ok(Self {
            model,
            vb,
            image_size: cfg.image_size,
            dim: cfg.hidden_size,
            cfg,
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
        let vcfg: VisionConfig = serde_json::from_value(tiny_vision_config(cfg))?;
        let (vb, weights) = super::seeded::var_builder(cfg.seed, device);
        let vb = vb.pp("vision_model");
        let model = VisionModel::new(&vcfg, true, vb.clone())?;
        let id = tiny_siglip_id(cfg);
        let (image_size, dim) = (cfg.image_size, cfg.hidden);
        Ok((Self { model, vb, cfg: vcfg, image_size, dim, id, device: device.clone() }, weights))
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Transformer layers (the depth `layered` chooses from).
    pub fn depth(&self) -> usize {
        self.cfg.num_hidden_layers
    }

    /// Features `[images.len() * dim]`, row-major.
    pub fn encode(&self, images: &[image::DynamicImage]) -> Result<Vec<f32>, FeatureError> {
        let out = self.model.forward(&self.pixels(images)?)?;
        Ok(out.reshape((images.len(), self.dim))?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// The tower cut after each of `layers` (0: the patch embeddings), for `LayeredImage`.
    pub fn layered(&self, layers: &[usize]) -> Result<LayeredImage<'_>, FeatureError> {
        // No pooling head: the states after layer `l`, through the final layer norm.
        let models = super::cut_at_layers(layers, self.depth(), |l| {
            VisionModel::new(&VisionConfig { num_hidden_layers: l, ..self.cfg.clone() }, false, self.vb.clone())
        })?;
        Ok(LayeredImage { encoder: self, models })
    }

    /// Preprocessed pixels `[images, 3, size, size]`.
    fn pixels(&self, images: &[image::DynamicImage]) -> Result<Tensor, FeatureError> {
        let s = self.image_size;
        let mut pixels = Vec::with_capacity(images.len() * 3 * s * s);
        for img in images {
            pixels.extend(preprocess(img, s));
        }
        Ok(Tensor::from_vec(pixels, (images.len(), 3, s, s), &self.device)?)
    }
}

/// An image tower's states after several layers, each layer-normed and mean-pooled over the
/// patches (IISAN's side networks read them).
pub struct LayeredImage<'e> {
    encoder: &'e ImageEncoder,
    models: Vec<VisionModel>,
}

impl LayeredImage<'_> {
    /// `[images.len() * layers * dim]`: per image, the pooled state after each layer in order.
    pub fn encode(&self, images: &[image::DynamicImage]) -> Result<Vec<f32>, FeatureError> {
        let x = self.encoder.pixels(images)?;
        let pooled = self.models.iter().map(|m| m.forward(&x)?.mean(1)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&pooled, 1)?.flatten_all()?.to_vec1::<f32>()?)
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

    #[test]
    fn layered_image_states_have_one_row_per_layer() {
        let cfg = TinySiglipConfig::default();
        let enc = ImageEncoder::tiny(&cfg, &Device::Cpu).unwrap();
        let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(20, 20, image::Rgb([200, 30, 30])));
        let depth = enc.depth();
        let out = enc.layered(&[0, depth]).unwrap().encode(&[img.clone(), img]).unwrap();
        let d = enc.dim();
        assert_eq!(out.len(), 2 * 2 * d);
        assert_eq!(&out[..2 * d], &out[2 * d..], "the same image, the same states");
        assert_ne!(&out[..d], &out[d..2 * d], "layer 0 and the last layer differ");
    }
}
