//! The content-addressed feature cache of one encoder, under the storage root:
//!
//! ```text
//! features/<encoder-id>/shards/<hash>.safetensors   FeatureTable whose row ids are content keys
//! features/<encoder-id>/index.json                  {"encoder", "dim", "shards": [...]}: written last
//! ```
//! A content key is the sha256 of what the encoder reads (image bytes, item text), or `id:<item id>`
//! for imported tables. A shard exists once the index names it, so a run stopped mid-way loses at most
//! the shard it was filling, and the next run computes only what no committed shard holds.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{FeatureError, FeatureTable};
use crate::store::{key, Store};

#[derive(Debug, Serialize, Deserialize)]
struct Index {
    encoder: String,
    dim: usize,
    shards: Vec<String>,
}

pub struct FeatureCache {
    store: Store,
    encoder: String,
    dim: usize,
    shards: Vec<String>,
    tables: Vec<FeatureTable>,
    /// content key -> (table, row)
    rows: HashMap<String, (usize, usize)>,
}

fn dir(encoder: &str) -> String {
    key(&["features", encoder])
}

impl FeatureCache {
    /// Opens the cache of `encoder` (empty if it has none yet), whose vectors have `dim` values.
    pub fn open(store: &Store, encoder: &str, dim: usize) -> Result<Self, FeatureError> {
        let index_key = key(&[&dir(encoder), "index.json"]);
        let mut cache = Self {
            store: store.clone(),
            encoder: encoder.to_string(),
            dim,
            shards: Vec::new(),
            tables: Vec::new(),
            rows: HashMap::new(),
        };
        let Some(bytes) = store.get_opt(&index_key)? else { return Ok(cache) };
        let index: Index =
            serde_json::from_slice(&bytes).map_err(|e| FeatureError::Invalid(format!("{index_key}: {e}")))?;
        if index.dim != dim {
            return Err(FeatureError::Invalid(format!(
                "{index_key}: the cache holds {}-d features, the encoder makes {dim}-d ones",
                index.dim
            )));
        }
        for shard in index.shards {
            let k = key(&[&dir(encoder), "shards", &shard]);
            let table = FeatureTable::from_bytes(&store.get_immutable(&k)?, &k)?;
            cache.add_table(shard, table);
        }
        Ok(cache)
    }

    fn add_table(&mut self, name: String, table: FeatureTable) {
        let t = self.tables.len();
        for (row, id) in table.item_ids.iter().enumerate() {
            self.rows.entry(id.clone()).or_insert((t, row));
        }
        self.shards.push(name);
        self.tables.push(table);
    }

    pub fn encoder(&self) -> &str {
        &self.encoder
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn contains(&self, content_key: &str) -> bool {
        self.rows.contains_key(content_key)
    }

    pub fn get(&self, content_key: &str) -> Option<&[f32]> {
        self.rows.get(content_key).map(|&(t, r)| self.tables[t].row(r))
    }

    /// Writes one shard of new vectors, then the index naming it.
    pub fn commit(&mut self, keys: Vec<String>, values: Vec<f32>) -> Result<(), FeatureError> {
        if keys.is_empty() {
            return Ok(());
        }
        let table = FeatureTable::new(keys, self.dim, values)?;
        let mut h = Sha256::new();
        for k in &table.item_ids {
            h.update(k.as_bytes());
            h.update([0]);
        }
        let name = format!("{}.safetensors", hex::encode(&h.finalize()[..12]));
        self.store.put_new(&key(&[&dir(&self.encoder), "shards", &name]), table.to_bytes())?;
        self.add_table(name, table);
        let index = Index { encoder: self.encoder.clone(), dim: self.dim, shards: self.shards.clone() };
        let bytes = serde_json::to_vec_pretty(&index).map_err(|e| FeatureError::Invalid(e.to_string()))?;
        self.store.put(&key(&[&dir(&self.encoder), "index.json"]), bytes)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_survive_reopening_and_dimension_mismatch_is_an_error() {
        let store = Store::open("memory://").unwrap();
        let mut c = FeatureCache::open(&store, "enc", 2).unwrap();
        assert!(c.is_empty());
        c.commit(vec!["a".into(), "b".into()], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        c.commit(vec!["c".into()], vec![5.0, 6.0]).unwrap();
        let again = FeatureCache::open(&store, "enc", 2).unwrap();
        assert_eq!(again.len(), 3);
        assert_eq!(again.get("b"), Some(&[3.0f32, 4.0][..]));
        assert_eq!(again.get("c"), Some(&[5.0f32, 6.0][..]));
        assert!(!again.contains("d"));
        assert!(FeatureCache::open(&store, "enc", 3).is_err());
    }

    #[test]
    fn a_shard_without_an_index_entry_does_not_exist() {
        let store = Store::open("memory://").unwrap();
        let table = FeatureTable::new(vec!["x".into()], 1, vec![1.0]).unwrap();
        store.put("features/enc/shards/orphan.safetensors", table.to_bytes()).unwrap();
        assert!(FeatureCache::open(&store, "enc", 1).unwrap().is_empty());
    }
}
