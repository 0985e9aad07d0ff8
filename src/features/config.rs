//! The `features` section of a job: which encoder produces each feature type.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::data::FeatureKind;
use crate::invalid::Invalid;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FeaturesConfig {
    #[serde(default)]
    pub image: Option<ImageSource>,
    #[serde(default)]
    pub text: Option<TextSource>,
    #[serde(default)]
    pub cf: Option<CfSource>,
    /// Captions of the item pictures (MSRBench's item enhancer): a captioning model or a file. Left
    /// out of the serialized config when unset, so runs recorded before it existed still resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captions: Option<super::captions::CaptionSource>,
    /// Items per encoder call.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Items per cache shard (a shard is committed as soon as it is full, so a stopped run resumes).
    #[serde(default = "d_shard")]
    pub shard_items: usize,
}

fn d_batch() -> usize {
    16
}
fn d_shard() -> usize {
    2048
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ImageSource {
    /// A SigLIP Hugging Face directory (config.json with a `vision_config`, model.safetensors); the
    /// pooled output of the vision tower is the feature (1152-d for so400m-patch14-384).
    Siglip {
        dir: PathBuf,
    },
    /// A tiny random SigLIP vision tower from a seed (tests, the demo).
    TinySiglip(TinySiglipConfig),
    Import(ImportConfig),
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TextSource {
    /// A BERT-family sentence encoder directory (config.json, model.safetensors, tokenizer.json):
    /// mean pooling over tokens, unit norm (all-MiniLM-L6-v2, all-mpnet-base-v2's BERT cousins).
    Bert {
        dir: PathBuf,
    },
    /// A tiny random BERT from a seed (tests, the demo).
    TinyBert(TinyBertConfig),
    Import(ImportConfig),
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CfSource {
    /// SASRec's item table from this job's `sasrec` run (`illmrec train --model sasrec`).
    Sasrec,
    /// SASRec's item table from the named run (`cf: {sasrec_run: ml100k-sasrec}`): jobs that share
    /// a dataset share its SASRec.
    SasrecRun(String),
    Import(ImportConfig),
}

/// Precomputed features: a safetensors file with one [N, d] f32 tensor, and the item ids of its rows
/// (the file's `item_ids` metadata, or `ids`: a JSON list or one id per line).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImportConfig {
    pub file: PathBuf,
    #[serde(default)]
    pub ids: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TinySiglipConfig {
    #[serde(default = "d_seed")]
    pub seed: u64,
    #[serde(default = "d_image_size")]
    pub image_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_width")]
    pub hidden: usize,
    #[serde(default = "d_layers")]
    pub layers: usize,
}

impl Default for TinySiglipConfig {
    fn default() -> Self {
        Self {
            seed: d_seed(),
            image_size: d_image_size(),
            patch_size: d_patch(),
            hidden: d_width(),
            layers: d_layers(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TinyBertConfig {
    #[serde(default = "d_seed")]
    pub seed: u64,
    #[serde(default = "d_width")]
    pub hidden: usize,
    #[serde(default = "d_layers")]
    pub layers: usize,
}

impl Default for TinyBertConfig {
    fn default() -> Self {
        Self { seed: d_seed(), hidden: d_width(), layers: d_layers() }
    }
}

fn d_seed() -> u64 {
    1
}
fn d_image_size() -> usize {
    32
}
fn d_patch() -> usize {
    8
}
fn d_width() -> usize {
    64
}
fn d_layers() -> usize {
    2
}

impl FeaturesConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.batch_size == 0 {
            return Err(Invalid::new("batch_size", "must be at least 1"));
        }
        if self.shard_items == 0 {
            return Err(Invalid::new("shard_items", "must be at least 1"));
        }
        if let Some(ImageSource::TinySiglip(t)) = &self.image {
            if t.patch_size == 0 || t.image_size % t.patch_size != 0 {
                return Err(Invalid::new("image.tiny_siglip.patch_size", "must divide image_size"));
            }
            if t.hidden % 4 != 0 || t.hidden == 0 || t.layers == 0 {
                return Err(Invalid::new(
                    "image.tiny_siglip.hidden",
                    "hidden must be a positive multiple of 4 and layers >= 1",
                ));
            }
        }
        if let Some(c) = &self.captions {
            c.validate().map_err(|e| Invalid::new(format!("captions.{}", e.key), e.message))?;
        }
        if let Some(TextSource::TinyBert(t)) = &self.text {
            if t.hidden % 4 != 0 || t.hidden == 0 || t.layers == 0 {
                return Err(Invalid::new(
                    "text.tiny_bert.hidden",
                    "hidden must be a positive multiple of 4 and layers >= 1",
                ));
            }
        }
        Ok(())
    }

    /// The feature types this job can compute or load.
    pub fn kinds(&self) -> Vec<FeatureKind> {
        let mut k = Vec::new();
        if self.image.is_some() {
            k.push(FeatureKind::Image);
        }
        if self.text.is_some() {
            k.push(FeatureKind::Text);
        }
        if self.cf.is_some() {
            k.push(FeatureKind::Cf);
        }
        k
    }
}

impl Default for FeaturesConfig {
    fn default() -> Self {
        Self { image: None, text: None, cf: None, captions: None, batch_size: d_batch(), shard_items: d_shard() }
    }
}
