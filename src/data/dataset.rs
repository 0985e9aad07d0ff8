//! A prepared dataset in memory: items indexed 1..=N (0 pads sequences), users 0..U, each user's
//! chronological sequence, and the sampled negatives stored with the split.
//!
//! Leave-one-out: train = seq[..n-2], valid target = seq[n-2], test target = seq[n-1]. At test time
//! the history is seq[..n-1] (train + the valid item), at valid time it is the train part.

use serde::{Deserialize, Serialize};

use super::ingest::ItemMeta;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Item {
    /// 1-based index used by every model.
    pub index: u32,
    /// The id in the source data (asin, RecBole item_id).
    pub id: String,
    #[serde(flatten)]
    pub meta: ItemMeta,
    /// Key of the image below the snapshot folder (`images/<sha256>.<ext>`), if the item has a
    /// readable image.
    pub image: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Valid,
    Test,
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "valid" => Ok(Split::Valid),
            "test" => Ok(Split::Test),
            _ => Err(format!("unknown split `{s}` (valid, test)")),
        }
    }
}

/// Per-user sampled negatives for valid and test, `per_user` each, row-major by user.
#[derive(Debug, Clone, PartialEq)]
pub struct Negatives {
    pub per_user: usize,
    pub valid: Vec<u32>,
    pub test: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    /// Content key of the snapshot this was loaded from.
    pub key: String,
    pub items: Vec<Item>,
    pub user_ids: Vec<String>,
    pub sequences: Vec<Vec<u32>>,
    pub negatives: Negatives,
    /// Fixed candidate lists for the test split, when the data came with them (`data.candidates`).
    pub candidates: Vec<super::candidates::CandidateList>,
}

impl Item {
    /// The sha256 of the item's image bytes, read off its content-named key.
    pub fn image_sha256(&self) -> Option<&str> {
        let key = self.image.as_deref()?;
        let name = key.rsplit('/').next()?;
        Some(name.split('.').next().unwrap_or(name))
    }
}

impl Dataset {
    pub fn num_items(&self) -> usize {
        self.items.len()
    }

    pub fn num_users(&self) -> usize {
        self.sequences.len()
    }

    pub fn item(&self, index: u32) -> &Item {
        &self.items[index as usize - 1]
    }

    pub fn train(&self, user: usize) -> &[u32] {
        let s = &self.sequences[user];
        &s[..s.len() - 2]
    }

    /// What a model may see when predicting the `split` target.
    pub fn history(&self, user: usize, split: Split) -> &[u32] {
        let s = &self.sequences[user];
        match split {
            Split::Valid => &s[..s.len() - 2],
            Split::Test => &s[..s.len() - 1],
        }
    }

    pub fn target(&self, user: usize, split: Split) -> u32 {
        let s = &self.sequences[user];
        match split {
            Split::Valid => s[s.len() - 2],
            Split::Test => s[s.len() - 1],
        }
    }

    /// The first `n` stored negatives of a user (n <= negatives.per_user, checked by the caller).
    pub fn negatives(&self, user: usize, split: Split, n: usize) -> &[u32] {
        let k = self.negatives.per_user;
        let all = match split {
            Split::Valid => &self.negatives.valid,
            Split::Test => &self.negatives.test,
        };
        &all[user * k..user * k + n]
    }
}
