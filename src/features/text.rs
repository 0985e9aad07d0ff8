//! Text features: a BERT-family sentence encoder (candle-transformers' BERT) over the item's text,
//! mean-pooled over real tokens and scaled to unit norm, as sentence-transformers' all-MiniLM-L6-v2
//! and its relatives are used.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::Tokenizer;

use super::config::TinyBertConfig;
use super::{hash_dir_files, load_err, FeatureError};
use crate::data::Item;

/// The text an item is encoded from: "Title: t. Brand: b. Category: c. Feature: f. Detailed
/// description: d." (empty fields left out).
pub fn item_text(item: &Item) -> String {
    let m = &item.meta;
    let fields = [
        ("Title", m.title.clone()),
        ("Brand", m.brand.clone()),
        ("Category", m.categories.join(", ")),
        ("Feature", m.features.join(" ")),
        ("Detailed description", m.description.clone()),
    ];
    let parts: Vec<String> = fields
        .iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .map(|(k, v)| format!("{k}: {}.", v.trim().trim_end_matches('.')))
        .collect();
    if parts.is_empty() {
        "Title: Unknown.".to_string()
    } else {
        parts.join(" ")
    }
}

pub struct TextEncoder {
    model: BertModel,
    /// The weights and config the model was built from: `layered` builds shallower copies.
    vb: VarBuilder<'static>,
    cfg: Config,
    tokenizer: Tokenizer,
    dim: usize,
    max_tokens: usize,
    pub id: String,
    device: Device,
}

impl TextEncoder {
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self, FeatureError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| load_err(&config_path, e))?;
        let cfg: Config = serde_json::from_str(&text).map_err(|e| load_err(&config_path, e))?;
        let weights = dir.join("model.safetensors");
        // SAFETY: mapped read-only; the file is not modified while the encoder lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .map_err(|e| load_err(&weights, e))?;
        let model = BertModel::load(vb.clone(), &cfg).map_err(|e| load_err(&weights, e))?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| load_err(&tok_path, e))?;
        // Truncation and padding are done here; a tokenizer.json that pads to a fixed length would
        // waste work.
        tokenizer.with_padding(None);
        let id = bert_id(dir)?;
        // sentence-transformers truncates all-MiniLM-L6-v2 inputs at 256 word pieces.
        let max_tokens = cfg.max_position_embeddings.min(256);
        let dim = cfg.hidden_size;
        Ok(Self { model, vb, cfg, tokenizer, dim, max_tokens, id, device: device.clone() })
    }

    pub fn tiny(cfg: &TinyBertConfig, device: &Device) -> Result<Self, FeatureError> {
        let tokenizer = crate::model::llm::tiny::tokenizer(1024).map_err(|e| FeatureError::Invalid(e.to_string()))?;
        let bert: Config = serde_json::from_value(tiny_bert_config(cfg, tokenizer.get_vocab_size(true)))?;
        let (vb, _) = super::seeded::var_builder(cfg.seed, device);
        let model = BertModel::load(vb.clone(), &bert)?;
        let (dim, id) = (cfg.hidden, tiny_bert_id(cfg));
        Ok(Self { model, vb, cfg: bert, tokenizer, dim, max_tokens: 256, id, device: device.clone() })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Transformer layers (the depth `layered` chooses from).
    pub fn depth(&self) -> usize {
        self.cfg.num_hidden_layers
    }

    /// Unit-norm features `[texts.len() * dim]`, row-major.
    pub fn encode(&self, texts: &[String]) -> Result<Vec<f32>, FeatureError> {
        let (ids, mask) = self.tokenize(texts)?;
        let mean = mean_pool(&self.model.forward(&ids, &ids.zeros_like()?, Some(&mask))?, &mask)?;
        let norm = mean.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok(mean.broadcast_div(&norm)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// The encoder cut after each of `layers` (0: the embeddings' output), for `LayeredText`.
    pub fn layered(&self, layers: &[usize]) -> Result<LayeredText<'_>, FeatureError> {
        let models = super::cut_at_layers(layers, self.depth(), |l| {
            BertModel::load(self.vb.clone(), &Config { num_hidden_layers: l, ..self.cfg.clone() })
        })?;
        Ok(LayeredText { encoder: self, models })
    }

    /// Token ids and the real-token mask `[texts, longest]`, truncated to `max_tokens`.
    fn tokenize(&self, texts: &[String]) -> Result<(Tensor, Tensor), FeatureError> {
        let mut rows = Vec::with_capacity(texts.len());
        for t in texts {
            let enc = self.tokenizer.encode(t.as_str(), true).map_err(|e| FeatureError::Invalid(e.to_string()))?;
            let mut ids = enc.get_ids().to_vec();
            ids.truncate(self.max_tokens);
            rows.push(ids);
        }
        let len = rows.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let n = rows.len();
        let mut ids = vec![0u32; n * len];
        let mut mask = vec![0f32; n * len];
        for (r, row) in rows.iter().enumerate() {
            ids[r * len..r * len + row.len()].copy_from_slice(row);
            mask[r * len..r * len + row.len()].iter_mut().for_each(|m| *m = 1.0);
        }
        Ok((Tensor::from_vec(ids, (n, len), &self.device)?, Tensor::from_vec(mask, (n, len), &self.device)?))
    }
}

/// The mean of `hidden` `[n, len, d]` over the real tokens of `mask` `[n, len]`: `[n, d]`.
fn mean_pool(hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let summed = hidden.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
    summed.broadcast_div(&mask.sum_keepdim(1)?.clamp(1.0, f64::MAX)?)
}

/// A text encoder's hidden states after several layers, mean-pooled over real tokens and not
/// normalised (IISAN's side networks read them).
pub struct LayeredText<'e> {
    encoder: &'e TextEncoder,
    models: Vec<BertModel>,
}

impl LayeredText<'_> {
    /// `[texts.len() * layers * dim]`: per text, the pooled state after each layer in order.
    pub fn encode(&self, texts: &[String]) -> Result<Vec<f32>, FeatureError> {
        let (ids, mask) = self.encoder.tokenize(texts)?;
        let pooled = self
            .models
            .iter()
            .map(|m| mean_pool(&m.forward(&ids, &ids.zeros_like()?, Some(&mask))?, &mask))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&pooled, 1)?.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// The cache id of a BERT directory (see `hash_dir_files`).
pub fn bert_id(dir: &Path) -> Result<String, FeatureError> {
    Ok(format!("bert-{}", hash_dir_files(dir, &["config.json", "model.safetensors", "tokenizer.json"])?))
}

pub fn tiny_bert_id(cfg: &TinyBertConfig) -> String {
    format!("tiny-bert-{}", super::hash_json(cfg))
}

fn tiny_bert_config(cfg: &TinyBertConfig, vocab: usize) -> serde_json::Value {
    serde_json::json!({
        "vocab_size": vocab,
        "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": 4,
        "intermediate_size": cfg.hidden * 2,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "classifier_dropout": null,
        "model_type": "bert",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ingest::ItemMeta;

    #[test]
    fn item_text_follows_the_template_and_skips_empty_fields() {
        let item = Item {
            index: 1,
            id: "a".into(),
            meta: ItemMeta {
                title: "Pen".into(),
                brand: String::new(),
                categories: vec!["Art".into(), "Pens".into()],
                features: vec!["blue".into(), "fine".into()],
                description: "A pen.".into(),
            },
            image: None,
        };
        assert_eq!(
            item_text(&item),
            "Title: Pen. Category: Art, Pens. Feature: blue fine. Detailed description: A pen."
        );
        let bare = Item { meta: ItemMeta::default(), ..item };
        assert_eq!(item_text(&bare), "Title: Unknown.");
    }

    #[test]
    fn tiny_bert_features_are_unit_norm_and_ignore_padding() {
        let enc = TextEncoder::tiny(&TinyBertConfig::default(), &Device::Cpu).unwrap();
        let short = "Title: Lamp.".to_string();
        let long = "Title: Classic red lamp. Brand: Kalo. Feature: Made of steel.".to_string();
        let both = enc.encode(&[short.clone(), long]).unwrap();
        let alone = enc.encode(&[short]).unwrap();
        let d = enc.dim();
        let norm: f32 = both[..d].iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        for (a, b) in alone.iter().zip(&both[..d]) {
            assert!((a - b).abs() < 1e-5, "padding changed the short text's feature");
        }
    }

    #[test]
    fn the_last_layer_cut_is_the_full_encoder_and_layer_zero_the_embeddings() {
        let enc = TextEncoder::tiny(&TinyBertConfig { layers: 2, ..TinyBertConfig::default() }, &Device::Cpu).unwrap();
        let texts = ["Title: Lamp.".to_string(), "Title: Red lamp. Brand: Kalo.".to_string()];
        let layered = enc.layered(&[0, 1, 2]).unwrap().encode(&texts).unwrap();
        let d = enc.dim();
        assert_eq!(layered.len(), 2 * 3 * d);
        // Layer 2 of 2, normalised, is the sentence feature.
        let full = enc.encode(&texts).unwrap();
        for t in 0..2 {
            let last = &layered[(t * 3 + 2) * d..(t * 3 + 3) * d];
            let norm = last.iter().map(|v| v * v).sum::<f32>().sqrt();
            for (a, b) in last.iter().zip(&full[t * d..(t + 1) * d]) {
                assert!((a / norm - b).abs() < 1e-5);
            }
        }
        // The cuts differ from one another.
        assert_ne!(&layered[..d], &layered[d..2 * d]);
        assert!(enc.layered(&[3]).is_err());
    }
}
