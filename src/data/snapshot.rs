//! A dataset snapshot under the storage root:
//!
//! ```text
//! datasets/<name>/<key>/manifest.json          counts, sources and their hashes, seed, config, skips
//! datasets/<name>/<key>/items.jsonl            one item per line, 1-based index, metadata, image key
//! datasets/<name>/<key>/sequences.jsonl        one user per line: chronological item indices, timestamps
//! datasets/<name>/<key>/negatives.safetensors  `valid` and `test`: u32 [users, negatives]
//! datasets/<name>/<key>/candidates.jsonl       fixed test candidate lists (user, candidates, target
//!                                              as indices), when the data came with them
//! datasets/<name>/<key>/images/<sha256>.<ext>  item images as read from the source, named by content
//! datasets/<name>/LATEST                       the key; written last, so a snapshot exists once named
//! ```
//! `<key>` hashes the sources and the data section of the job, so preparing again reuses it.

use serde::{Deserialize, Serialize};

use super::candidates::CandidateList;
use super::dataset::{Dataset, Item, Negatives};
use super::error::{DataError, Result};
use super::ingest::{SkipReport, SourceFile};
use super::kcore::Counts;
use crate::store::{key, Store};
use crate::tensorfile::{to_bytes, Array, TensorFile};

pub const FORMAT: u32 = 2;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    pub key: String,
    /// The snapshot this one grew from (catalog growth); none for a first version.
    pub parent: Option<String>,
    pub seed: u64,
    pub config: serde_json::Value,
    pub sources: Vec<SourceFile>,
    /// As read (valid records, duplicates removed).
    pub counts_read: Counts,
    /// After k-core and image filtering: what the snapshot holds.
    pub counts: Counts,
    pub items_without_metadata: usize,
    pub items_with_image: usize,
    pub items_dropped_without_image: usize,
    pub skipped: SkipReport,
    pub negatives_per_user: usize,
    /// Fixed candidate lists stored with the snapshot (`data.candidates`).
    #[serde(default)]
    pub candidate_lists: usize,
    pub split: String,
}

#[derive(Serialize, Deserialize)]
struct SequenceLine {
    user: usize,
    id: String,
    items: Vec<u32>,
    timestamps: Vec<f64>,
}

pub fn dir(name: &str, snapshot_key: &str) -> String {
    key(&["datasets", name, snapshot_key])
}

fn latest_key(name: &str) -> String {
    key(&["datasets", name, "LATEST"])
}

/// The key of the latest snapshot of dataset `name`, if any.
pub fn latest(store: &Store, name: &str) -> Result<Option<String>> {
    Ok(store.get_string(&latest_key(name))?)
}

pub fn read_manifest(store: &Store, name: &str, snapshot_key: &str) -> Result<Option<Manifest>> {
    let k = key(&[&dir(name, snapshot_key), "manifest.json"]);
    match store.get_opt(&k)? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| DataError::Invalid(format!("{k}: {e}"))),
    }
}

/// Everything a snapshot holds besides images, which the caller writes first.
pub struct Contents<'a> {
    pub manifest: &'a Manifest,
    pub items: &'a [Item],
    pub user_ids: &'a [String],
    pub sequences: &'a [Vec<u32>],
    pub timestamps: &'a [Vec<f64>],
    pub negatives: &'a Negatives,
    pub candidates: &'a [CandidateList],
}

/// Writes the snapshot's files, then the manifest, then LATEST.
pub fn write(store: &Store, c: Contents<'_>) -> Result<()> {
    let base = dir(&c.manifest.name, &c.manifest.key);
    let mut items = Vec::new();
    for it in c.items {
        serde_json::to_writer(&mut items, it).map_err(|e| DataError::Invalid(e.to_string()))?;
        items.push(b'\n');
    }
    store.put_new(&key(&[&base, "items.jsonl"]), items)?;
    let mut seqs = Vec::new();
    for (user, (items, ts)) in c.sequences.iter().zip(c.timestamps).enumerate() {
        let line = SequenceLine { user, id: c.user_ids[user].clone(), items: items.clone(), timestamps: ts.clone() };
        serde_json::to_writer(&mut seqs, &line).map_err(|e| DataError::Invalid(e.to_string()))?;
        seqs.push(b'\n');
    }
    store.put_new(&key(&[&base, "sequences.jsonl"]), seqs)?;
    let users = c.sequences.len();
    let k = c.negatives.per_user;
    let neg = to_bytes(
        vec![
            ("valid".into(), Array::U32(&c.negatives.valid, vec![users, k])),
            ("test".into(), Array::U32(&c.negatives.test, vec![users, k])),
        ],
        None,
    );
    store.put_new(&key(&[&base, "negatives.safetensors"]), neg)?;
    if !c.candidates.is_empty() {
        let mut lists = Vec::new();
        for l in c.candidates {
            serde_json::to_writer(&mut lists, l).map_err(|e| DataError::Invalid(e.to_string()))?;
            lists.push(b'\n');
        }
        store.put_new(&key(&[&base, "candidates.jsonl"]), lists)?;
    }
    let manifest = serde_json::to_vec_pretty(c.manifest).map_err(|e| DataError::Invalid(e.to_string()))?;
    store.put_new(&key(&[&base, "manifest.json"]), manifest)?;
    store.put(&latest_key(&c.manifest.name), c.manifest.key.clone())?;
    Ok(())
}

/// Loads the latest snapshot of dataset `name`.
pub fn load(store: &Store, name: &str) -> Result<Dataset> {
    let snapshot_key = latest(store, name)?.ok_or_else(|| {
        DataError::Invalid(format!(
            "no prepared dataset `{name}` under {}: run `illmrec prepare --job FILE` first",
            store.url()
        ))
    })?;
    let base = dir(name, &snapshot_key);
    let bad = |what: &str, e: &dyn std::fmt::Display| DataError::Invalid(format!("{}/{base}/{what}: {e}", store.url()));
    let items_bytes = store.get_immutable(&key(&[&base, "items.jsonl"]))?;
    let mut items = Vec::new();
    for (i, line) in items_bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()).enumerate() {
        let item: Item = serde_json::from_slice(line).map_err(|e| bad(&format!("items.jsonl:{}", i + 1), &e))?;
        if item.index as usize != i + 1 {
            return Err(bad(&format!("items.jsonl:{}", i + 1), &"item indices must be 1, 2, 3, ... in order"));
        }
        items.push(item);
    }
    let seq_bytes = store.get_immutable(&key(&[&base, "sequences.jsonl"]))?;
    let (mut user_ids, mut sequences) = (Vec::new(), Vec::new());
    for (i, line) in seq_bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()).enumerate() {
        let s: SequenceLine =
            serde_json::from_slice(line).map_err(|e| bad(&format!("sequences.jsonl:{}", i + 1), &e))?;
        if s.items.len() < 3 || s.items.iter().any(|&x| x == 0 || x as usize > items.len()) {
            return Err(bad(
                &format!("sequences.jsonl:{}", i + 1),
                &"a sequence needs 3+ items with indices in 1..=items",
            ));
        }
        user_ids.push(s.id);
        sequences.push(s.items);
    }
    let neg_bytes = store.get_immutable(&key(&[&base, "negatives.safetensors"]))?;
    let tf = TensorFile::parse(&neg_bytes, &format!("{base}/negatives.safetensors"))
        .map_err(|e| bad("negatives.safetensors", &e))?;
    let (vshape, valid) = tf.u32("valid").map_err(|e| bad("negatives.safetensors", &e))?;
    let (tshape, test) = tf.u32("test").map_err(|e| bad("negatives.safetensors", &e))?;
    if vshape.len() != 2 || vshape[0] != sequences.len() || tshape != vshape {
        return Err(bad(
            "negatives.safetensors",
            &format!("shapes {vshape:?} / {tshape:?} do not match {} users", sequences.len()),
        ));
    }
    let negatives = Negatives { per_user: vshape[1], valid, test };
    let mut candidates = Vec::new();
    if let Some(bytes) = store.get_opt(&key(&[&base, "candidates.jsonl"]))? {
        for (i, line) in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()).enumerate() {
            let l: CandidateList =
                serde_json::from_slice(line).map_err(|e| bad(&format!("candidates.jsonl:{}", i + 1), &e))?;
            let known = |x: u32| x >= 1 && x as usize <= items.len();
            if l.user >= sequences.len() || !known(l.target) || !l.candidates.iter().all(|&c| known(c)) {
                return Err(bad(&format!("candidates.jsonl:{}", i + 1), &"an index outside the snapshot"));
            }
            candidates.push(l);
        }
    }
    Ok(Dataset { name: name.to_string(), key: snapshot_key, items, user_ids, sequences, negatives, candidates })
}
