//! The `data` section of a job: where raw data comes from and how it becomes a snapshot.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::invalid::Invalid;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The dataset's name in storage (default: the job's name). Jobs that share it share its
    /// versions: a grown catalog prepared under the same name becomes the next version, recording
    /// the one before as its parent.
    #[serde(default, skip_serializing)]
    pub dataset: Option<String>,
    pub source: SourceConfig,
    /// What `illmrec synth` generates (in the Amazon layout, read back through an `amazon` source).
    #[serde(default, skip_serializing)]
    pub synth: Option<SynthConfig>,
    /// Iterative k-core on users and items.
    #[serde(default = "default_k_core")]
    pub k_core: usize,
    /// Users need at least this many interactions (leave-one-out needs 3).
    #[serde(default = "default_min_user")]
    pub min_user_interactions: usize,
    /// Drop items without a readable image (the paper's protocol for image catalogs).
    #[serde(default)]
    pub require_image: bool,
    /// Sampled negatives stored per user for valid and for test; protocol `sampled:N` uses the first N.
    #[serde(default = "default_negatives")]
    pub negatives: usize,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// What to do with a bad record (malformed line, missing field, duplicate, unreadable image).
    #[serde(default)]
    pub on_bad_record: OnBadRecord,
    /// Fixed test candidate lists to store with the snapshot (JSON lines of {user, candidates,
    /// target}, source ids; `data::candidates`), scored by the `candidates` protocol.
    #[serde(default)]
    pub candidates: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// RecBole atomic files `<dir>/<name>.inter` and (optional) `<dir>/<name>.item`.
    Recbole { dir: PathBuf, name: String },
    /// Amazon Reviews 2018: reviews and metadata as JSON lines (plain or gzip), images named by asin.
    Amazon {
        reviews: PathBuf,
        meta: PathBuf,
        #[serde(default)]
        images: Option<PathBuf>,
    },
    /// Ready-made sequences (`user item item ...` per line, oldest first) and an item table (TSV with
    /// an `item_id` column), as P5 / S3-Rec / MSRBench ship their Amazon subsets; images named by
    /// the table's `image` column, under `images`.
    Sequences {
        file: PathBuf,
        items: PathBuf,
        #[serde(default)]
        images: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBadRecord {
    /// Stop with an error naming the file and line.
    #[default]
    Error,
    /// Skip the record, count it, and report the counts at the end.
    Skip,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SynthConfig {
    /// Folder the catalog is written to: reviews.jsonl.gz, meta.jsonl.gz, images/<asin>.png.
    pub out: PathBuf,
    pub items: usize,
    pub users: usize,
    #[serde(default = "default_categories")]
    pub categories: usize,
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "default_image_size")]
    pub image_size: u32,
    #[serde(default = "default_min_len")]
    pub min_sequence: usize,
    #[serde(default = "default_max_len")]
    pub max_sequence: usize,
    /// Share of items whose image file is not written (the paper's missing-image case).
    #[serde(default)]
    pub missing_image_rate: f64,
}

fn default_k_core() -> usize {
    5
}
fn default_min_user() -> usize {
    3
}
fn default_negatives() -> usize {
    100
}
fn default_seed() -> u64 {
    2024
}
fn default_categories() -> usize {
    24
}
fn default_image_size() -> u32 {
    64
}
fn default_min_len() -> usize {
    6
}
fn default_max_len() -> usize {
    20
}

impl DataConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.k_core == 0 {
            return Err(Invalid::new("k_core", "must be at least 1"));
        }
        if self.min_user_interactions < 3 {
            return Err(Invalid::new(
                "min_user_interactions",
                "must be at least 3 (train, valid and test need one item each)",
            ));
        }
        if self.negatives == 0 {
            return Err(Invalid::new("negatives", "must be at least 1"));
        }
        if let SourceConfig::Recbole { name, .. } = &self.source {
            if name.is_empty() {
                return Err(Invalid::new("source.recbole.name", "must not be empty"));
            }
        }
        if let Some(s) = &self.synth {
            s.validate().map_err(|e| Invalid::new(format!("synth.{}", e.key), e.message))?;
        }
        Ok(())
    }
}

impl SynthConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.categories < 2 {
            return Err(Invalid::new("categories", "must be at least 2"));
        }
        if self.items < 10 * self.categories || self.items > 1_000_000 {
            return Err(Invalid::new(
                "items",
                format!("must be between 10 x categories ({}) and 1000000", 10 * self.categories),
            ));
        }
        if self.users == 0 {
            return Err(Invalid::new("users", "must be at least 1"));
        }
        if !(16..=512).contains(&self.image_size) {
            return Err(Invalid::new("image_size", "must be between 16 and 512 pixels"));
        }
        if self.min_sequence < 3 || self.max_sequence < self.min_sequence {
            return Err(Invalid::new("min_sequence", "need 3 <= min_sequence <= max_sequence"));
        }
        if !(0.0..1.0).contains(&self.missing_image_rate) {
            return Err(Invalid::new("missing_image_rate", "must be in [0, 1)"));
        }
        Ok(())
    }
}
