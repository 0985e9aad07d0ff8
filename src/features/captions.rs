//! Item captions: what an image-to-text model says about each item's picture (MSRBench's item
//! enhancer), computed once per picture and cached, or imported from captions others wrote.
//!
//! ```text
//! features/<captioner-id>/shards/<hash>.jsonl   {"key": <image sha256>, "caption": "..."} per line
//! features/<captioner-id>/index.json            captioner, shard list; rewritten last
//! ```
//! The captioner id hashes the model, the prompt and the length limit, so a caption is reused only
//! for the same picture, model and prompt. A shard is committed every `COMMIT_EVERY` captions: a run
//! stopped half-way resumes where the last shard ended.
//!
//! Imported captions come from a JSON object keyed by item id whose values are either
//! `{model: caption}` or Amazon Review Plus's `item2side.json` records (the captions under
//! `image.image_description`); `model` picks whose caption to use.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::captioner::Blip;
use super::{load_err, FeatureError};
use crate::data::{snapshot, Dataset};
use crate::invalid::Invalid;
use crate::store::{key, Store};
use crate::telemetry::{Progress, TelemetryConfig};

/// Captions per shard: captioning is slow, so progress is committed often.
const COMMIT_EVERY: usize = 32;

/// `features.captions` in a job.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CaptionSource {
    /// A BLIP image-captioning Hugging Face directory (config.json, model.safetensors,
    /// tokenizer.json), e.g. Salesforce/blip-image-captioning-base.
    Blip {
        dir: PathBuf,
        /// Text the caption starts from (BLIP's conditional captioning).
        #[serde(default = "d_prompt")]
        prompt: String,
        #[serde(default = "d_max_tokens")]
        max_tokens: usize,
    },
    /// A tiny BLIP with seeded random weights (tests, code-path checks: its captions mean nothing).
    TinyBlip {
        #[serde(default)]
        seed: u64,
        #[serde(default = "d_prompt")]
        prompt: String,
        #[serde(default = "d_max_tokens")]
        max_tokens: usize,
    },
    /// Captions from a JSON file (item id -> {model: caption}, or Amazon Review Plus's item2side.json).
    Import { file: PathBuf, model: String },
}

fn d_prompt() -> String {
    "a picture of".into()
}
fn d_max_tokens() -> usize {
    30
}

impl CaptionSource {
    /// The captioner's cache id and its prompt and length limit; `None` for imported captions.
    fn captioner(&self) -> Result<Option<(String, &str, usize)>, FeatureError> {
        Ok(match self {
            CaptionSource::Blip { dir, prompt, max_tokens } => {
                Some((Blip::cache_id(dir, prompt, *max_tokens)?, prompt.as_str(), *max_tokens))
            }
            CaptionSource::TinyBlip { seed, prompt, max_tokens } => {
                Some((Blip::tiny_cache_id(*seed, prompt, *max_tokens), prompt.as_str(), *max_tokens))
            }
            CaptionSource::Import { .. } => None,
        })
    }

    fn load_captioner(&self) -> Result<Blip, FeatureError> {
        match self {
            CaptionSource::Blip { dir, .. } => Blip::load(dir),
            CaptionSource::TinyBlip { seed, .. } => Blip::tiny(*seed),
            CaptionSource::Import { .. } => Err(FeatureError::Invalid("imported captions have no captioner".into())),
        }
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        match self {
            CaptionSource::Blip { max_tokens: 0, .. } => Err(Invalid::new("blip.max_tokens", "must be at least 1")),
            CaptionSource::TinyBlip { max_tokens: 0, .. } => {
                Err(Invalid::new("tiny_blip.max_tokens", "must be at least 1"))
            }
            CaptionSource::Import { model, .. } if model.trim().is_empty() => {
                Err(Invalid::new("import.model", "name whose captions to use (e.g. gpt4o)"))
            }
            _ => Ok(()),
        }
    }
}

/// The caption of every item that has one, by item index.
#[derive(Debug, Clone, Default)]
pub struct Captions {
    /// Where they come from, for reports.
    pub source: String,
    by_item: HashMap<u32, String>,
}

impl Captions {
    pub fn get(&self, item: u32) -> Option<&str> {
        self.by_item.get(&item).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.by_item.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_item.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn from_pairs(source: &str, pairs: impl IntoIterator<Item = (u32, String)>) -> Self {
        Self { source: source.into(), by_item: pairs.into_iter().collect() }
    }
}

/// What `compute` did.
#[derive(Debug, Clone, Serialize)]
pub struct CaptionsReport {
    pub source: String,
    pub computed: usize,
    pub reused: usize,
    pub without_image: usize,
}

#[derive(Serialize, Deserialize)]
struct Line {
    key: String,
    caption: String,
}

#[derive(Serialize, Deserialize)]
struct Index {
    captioner: String,
    shards: Vec<String>,
}

/// The committed captions of one captioner, by image sha256.
struct CaptionCache {
    store: Store,
    id: String,
    shards: Vec<String>,
    captions: HashMap<String, String>,
}

impl CaptionCache {
    fn open(store: &Store, id: &str) -> Result<Self, FeatureError> {
        let mut cache = Self { store: store.clone(), id: id.into(), shards: Vec::new(), captions: HashMap::new() };
        let index_key = key(&["features", id, "index.json"]);
        let Some(bytes) = store.get_opt(&index_key)? else { return Ok(cache) };
        let index: Index =
            serde_json::from_slice(&bytes).map_err(|e| FeatureError::Invalid(format!("{index_key}: {e}")))?;
        for shard in index.shards {
            let k = key(&["features", id, "shards", &shard]);
            let text = String::from_utf8_lossy(&store.get_immutable(&k)?).into_owned();
            for (n, line) in text.lines().enumerate() {
                let l: Line =
                    serde_json::from_str(line).map_err(|e| FeatureError::Invalid(format!("{k}:{}: {e}", n + 1)))?;
                cache.captions.insert(l.key, l.caption);
            }
            cache.shards.push(shard);
        }
        Ok(cache)
    }

    /// Writes a shard of new captions, then the index naming it.
    fn commit(&mut self, new: Vec<(String, String)>) -> Result<(), FeatureError> {
        if new.is_empty() {
            return Ok(());
        }
        let mut body = String::new();
        let mut h = Sha256::new();
        for (k, caption) in &new {
            body.push_str(&serde_json::to_string(&Line { key: k.clone(), caption: caption.clone() })?);
            body.push('\n');
            h.update(k.as_bytes());
            h.update([0]);
        }
        let name = format!("{}.jsonl", hex::encode(&h.finalize()[..12]));
        self.store.put_new(&key(&["features", &self.id, "shards", &name]), body.into_bytes())?;
        self.shards.push(name);
        self.captions.extend(new);
        let index = Index { captioner: self.id.clone(), shards: self.shards.clone() };
        self.store.put(&key(&["features", &self.id, "index.json"]), serde_json::to_vec_pretty(&index)?)?;
        Ok(())
    }
}

/// Captions every item picture the captioner has not captioned yet (imported captions need nothing).
pub fn compute(
    source: &CaptionSource,
    ds: &Dataset,
    store: &Store,
    telemetry: &TelemetryConfig,
) -> Result<CaptionsReport, FeatureError> {
    let Some((id, prompt, max_tokens)) = source.captioner()? else {
        let captions = load(source, ds, store)?;
        return Ok(CaptionsReport {
            source: captions.source.clone(),
            computed: 0,
            reused: captions.len(),
            without_image: ds.num_items() - captions.len(),
        });
    };
    let mut cache = CaptionCache::open(store, &id)?;
    let mut todo = Vec::new();
    let (mut reused, mut without_image) = (0, 0);
    let mut seen = std::collections::HashSet::new();
    for item in &ds.items {
        match item.image_sha256() {
            None => without_image += 1,
            Some(sha) if cache.captions.contains_key(sha) || !seen.insert(sha.to_string()) => reused += 1,
            Some(sha) => todo.push((item, sha.to_string())),
        }
    }
    if todo.is_empty() {
        return Ok(CaptionsReport { source: id, computed: 0, reused, without_image });
    }
    let mut blip = source.load_captioner()?;
    let snapshot_dir = snapshot::dir(&ds.name, &ds.key);
    let mut progress = Progress::new(telemetry, "captions", todo.len() as u64);
    let mut pending = Vec::new();
    for (item, sha) in &todo {
        let img = super::read_image(store, &snapshot_dir, item)?;
        let caption = blip
            .caption(&img, prompt, max_tokens)
            .map_err(|e| FeatureError::Item { item: item.id.clone(), reason: format!("captioning: {e}") })?;
        pending.push((sha.clone(), caption));
        if pending.len() >= COMMIT_EVERY {
            cache.commit(std::mem::take(&mut pending))?;
        }
        progress.inc(1);
    }
    cache.commit(pending)?;
    progress.finish();
    Ok(CaptionsReport { source: id, computed: todo.len(), reused, without_image })
}

/// The captions of `ds`'s items: cached ones for a captioner (items not captioned yet have none), or
/// the imported file's.
pub fn load(source: &CaptionSource, ds: &Dataset, store: &Store) -> Result<Captions, FeatureError> {
    match source {
        CaptionSource::Blip { .. } | CaptionSource::TinyBlip { .. } => {
            let id = source.captioner()?.map(|(id, _, _)| id).unwrap_or_default();
            let cache = CaptionCache::open(store, &id)?;
            let by_item = ds
                .items
                .iter()
                .filter_map(|i| Some((i.index, cache.captions.get(i.image_sha256()?)?.clone())))
                .collect();
            Ok(Captions { source: id, by_item })
        }
        CaptionSource::Import { file, model } => {
            let text = std::fs::read_to_string(file).map_err(|e| load_err(file, e))?;
            let table = import(&text, model).map_err(|e| load_err(file, e))?;
            let by_item = ds.items.iter().filter_map(|i| Some((i.index, table.get(&i.id)?.clone()))).collect();
            Ok(Captions { source: format!("{} ({model})", file.display()), by_item })
        }
    }
}

/// Item id -> `model`'s caption, from either layout; items without that model's caption are left out.
fn import(text: &str, model: &str) -> Result<HashMap<String, String>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object keyed by item id")?;
    let mut out = HashMap::new();
    for (item, record) in obj {
        let by_model = record.get("image").and_then(|i| i.get("image_description")).unwrap_or(record);
        match by_model.get(model) {
            Some(serde_json::Value::String(c)) if !c.trim().is_empty() => {
                out.insert(item.clone(), c.trim().to_string());
            }
            Some(serde_json::Value::String(_)) | None => {}
            Some(other) => return Err(format!("item `{item}`: the `{model}` caption is {other}, not text")),
        }
    }
    if out.is_empty() {
        return Err(format!("no item has a `{model}` caption"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_import_layouts_give_the_models_captions() {
        let plain = r#"{"101": {"gpt4o": "A red lamp.", "claude3": "Lamp"}, "102": {"claude3": "Chair"}}"#;
        let t = import(plain, "gpt4o").unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t["101"], "A red lamp.");
        let plus = r#"{"83": {"asin": "9759091062", "title": "Xtreme Brite Gel",
            "image": {"image_path": "41QW.jpg", "image_description": {"gpt4o": " A pink box. ", "gpt4v": "Gel"}}}}"#;
        assert_eq!(import(plus, "gpt4o").unwrap()["83"], "A pink box.");
        assert!(import(plus, "llava").unwrap_err().contains("no item has a `llava` caption"));
        assert!(import("[1, 2]", "m").unwrap_err().contains("keyed by item id"));
        assert!(import(r#"{"1": {"m": 3}}"#, "m").unwrap_err().contains("not text"));
    }

    #[test]
    fn committed_captions_survive_reopening_and_uncommitted_shards_do_not_exist() {
        let store = Store::open("memory://").unwrap();
        let mut c = CaptionCache::open(&store, "cap-x").unwrap();
        c.commit(vec![("sha-a".into(), "a red lamp".into())]).unwrap();
        c.commit(vec![("sha-b".into(), "a \"blue\" chair".into())]).unwrap();
        store.put("features/cap-x/shards/orphan.jsonl", b"{\"key\":\"sha-c\",\"caption\":\"x\"}\n".to_vec()).unwrap();
        let again = CaptionCache::open(&store, "cap-x").unwrap();
        assert_eq!(again.captions.len(), 2);
        assert_eq!(again.captions["sha-b"], "a \"blue\" chair");
        assert!(!again.captions.contains_key("sha-c"));
    }
}
