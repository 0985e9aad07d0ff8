//! Item features, computed once per item and cached by content: image (SigLIP), text (BERT-family
//! sentence encoder), CF (SASRec's item table), or imported from a precomputed table.
//!
//! `compute` fills the caches for a dataset snapshot, encoding only items whose content key is not
//! cached yet; `load` assembles, for one feature type, the matrix the model reads (row i = item i).

pub mod cache;
pub mod captioner;
pub mod captions;
mod config;
pub mod image;
pub mod layers;
mod seeded;
mod table;
pub mod text;

use std::path::Path;
use std::time::Instant;

use candle_core::Device;
use sha2::{Digest, Sha256};

pub use cache::FeatureCache;
pub use config::{
    CfSource, FeatureKind, FeaturesConfig, ImageSource, ImportConfig, TextSource, TinyBertConfig, TinySiglipConfig,
};
pub use table::{FeatureTable, FeatureTableError};

pub(crate) use seeded::var_builder as seeded_var_builder;

use crate::data::{snapshot, Dataset};
use crate::store::{key, Store, StoreError};
use crate::telemetry::{Progress, TelemetryConfig};

#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error("{path}: {reason}")]
    Load { path: std::path::PathBuf, reason: String },
    #[error("item `{item}`: {reason}")]
    Item { item: String, reason: String },
    #[error("{kind} features are missing for {count} item(s), e.g. {examples}: {hint}")]
    Missing { kind: FeatureKind, count: usize, examples: String, hint: String },
    #[error(transparent)]
    Table(#[from] FeatureTableError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Invalid(String),
}

impl From<serde_json::Error> for FeatureError {
    fn from(e: serde_json::Error) -> Self {
        FeatureError::Invalid(e.to_string())
    }
}

pub(crate) fn load_err(path: &Path, reason: impl std::fmt::Display) -> FeatureError {
    FeatureError::Load { path: path.to_path_buf(), reason: reason.to_string() }
}

/// A short stable hash of a serializable value (tiny encoders are identified by their config).
pub(crate) fn hash_json(value: &impl serde::Serialize) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..8])
}

/// Identifies a model directory without reading its weights in full: the whole of each small file,
/// and of `*.safetensors` files their length and header (names, shapes, offsets of every tensor).
pub(crate) fn hash_dir_files(dir: &Path, names: &[&str]) -> Result<String, FeatureError> {
    let mut h = Sha256::new();
    for name in names {
        let path = dir.join(name);
        h.update(name.as_bytes());
        if name.ends_with(".safetensors") {
            use std::io::Read;
            let mut f = std::fs::File::open(&path).map_err(|e| load_err(&path, e))?;
            let len = f.metadata().map_err(|e| load_err(&path, e))?.len();
            let mut head = vec![0u8; len.min(1 << 20) as usize];
            f.read_exact(&mut head).map_err(|e| load_err(&path, e))?;
            h.update(len.to_le_bytes());
            h.update(&head);
        } else {
            h.update(std::fs::read(&path).map_err(|e| load_err(&path, e))?);
        }
    }
    Ok(hex::encode(&h.finalize()[..8]))
}

/// One model per entry of `layers`, each cut after that layer by `build` (candle's encoders keep
/// their layers private: a model built with the first `l` layers of the same weights returns the
/// states after layer `l`). A layer beyond `depth` is an error.
fn cut_at_layers<M>(
    layers: &[usize],
    depth: usize,
    build: impl Fn(usize) -> candle_core::Result<M>,
) -> Result<Vec<M>, FeatureError> {
    layers
        .iter()
        .map(|&l| match l <= depth {
            true => Ok(build(l)?),
            false => Err(FeatureError::Invalid(format!("layer {l} of a {depth}-layer encoder"))),
        })
        .collect()
}

/// Where a trained SASRec run keeps its item table (the CF feature). The pipeline hands this key to
/// `compute` and `load`; this module never guesses which run it is.
pub fn cf_table_key(sasrec_run: &str) -> String {
    key(&["runs", sasrec_run, "features", "cf.safetensors"])
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The content key of an item for a feature type: what the encoder reads, hashed; `None` when the
/// item has no such input (no image).
fn content_key(kind: FeatureKind, item: &crate::data::Item) -> Option<String> {
    match kind {
        FeatureKind::Image => item.image_sha256().map(str::to_string),
        FeatureKind::Text => Some(sha256_hex(text::item_text(item).as_bytes())),
        FeatureKind::Cf => Some(format!("id:{}", item.id)),
    }
}

/// What `compute` did for one feature type.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KindReport {
    pub kind: FeatureKind,
    pub encoder: String,
    pub dim: usize,
    pub computed: usize,
    pub reused: usize,
    /// Items without this input (no image): they use the text feature through the fallback adaptor.
    pub without_input: usize,
    pub seconds: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FeaturesReport(pub Vec<KindReport>);

impl std::fmt::Display for FeaturesReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "  {:<6} {:<28} {:>5} {:>9} {:>9} {:>9} {:>8}",
            "kind", "encoder", "dim", "computed", "reused", "no input", "seconds"
        )?;
        for r in &self.0 {
            writeln!(
                f,
                "  {:<6} {:<28} {:>5} {:>9} {:>9} {:>9} {:>8.1}",
                r.kind.name(),
                r.encoder,
                r.dim,
                r.computed,
                r.reused,
                r.without_input,
                r.seconds
            )?;
        }
        Ok(())
    }
}

/// The encoder behind a feature type, with the id and dimension that name its cache.
enum Encoder {
    Image(Box<image::ImageEncoder>),
    Text(Box<text::TextEncoder>),
}

impl Encoder {
    fn id(&self) -> &str {
        match self {
            Encoder::Image(e) => &e.id,
            Encoder::Text(e) => &e.id,
        }
    }
    fn dim(&self) -> usize {
        match self {
            Encoder::Image(e) => e.dim(),
            Encoder::Text(e) => e.dim(),
        }
    }
}

/// Fills the caches of every configured feature type for the snapshot `ds`; the CF feature is read
/// from the item table at `cf_table`.
pub fn compute(
    cfg: &FeaturesConfig,
    ds: &Dataset,
    store: &Store,
    cf_table: &str,
    telemetry: &TelemetryConfig,
    device: &Device,
) -> Result<FeaturesReport, FeatureError> {
    let mut reports = Vec::new();
    let _stage = tracing::info_span!("stage", stage = "features", items = ds.num_items() as i64).entered();
    for kind in cfg.kinds() {
        let _span = tracing::info_span!("features.extract", kind = %kind).entered();
        let started = Instant::now();
        let mut report = match (kind, import_of(cfg, kind)) {
            (_, Some(import)) => import_table(import, kind, ds, store)?,
            (FeatureKind::Cf, None) => {
                let table = load_cf_table(store, cf_table)?;
                KindReport {
                    kind,
                    encoder: format!("table {cf_table}"),
                    dim: table.dim,
                    computed: 0,
                    reused: table.item_ids.len(),
                    without_input: 0,
                    seconds: 0.0,
                }
            }
            (kind, None) => {
                let encoder = build_encoder(cfg, kind, device)?;
                let snapshot_dir = snapshot::dir(&ds.name, &ds.key);
                let mut encode = |batch: &[(&crate::data::Item, String)]| match &encoder {
                    Encoder::Image(e) => e.encode(&read_images(store, &snapshot_dir, batch)?),
                    Encoder::Text(e) => e.encode(&item_texts(batch)),
                };
                let target = CacheTarget { id: encoder.id(), dim: encoder.dim(), kind };
                encode_missing(&target, cfg, ds, store, telemetry, &mut encode)?
            }
        };
        report.seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            "features {kind}: {} computed, {} reused, {} without input, {:.1}s",
            report.computed,
            report.reused,
            report.without_input,
            report.seconds
        );
        reports.push(report);
    }
    Ok(FeaturesReport(reports))
}

fn import_of(cfg: &FeaturesConfig, kind: FeatureKind) -> Option<&ImportConfig> {
    match kind {
        FeatureKind::Image => match &cfg.image {
            Some(ImageSource::Import(i)) => Some(i),
            _ => None,
        },
        FeatureKind::Text => match &cfg.text {
            Some(TextSource::Import(i)) => Some(i),
            _ => None,
        },
        FeatureKind::Cf => match &cfg.cf {
            Some(CfSource::Import(i)) => Some(i),
            _ => None,
        },
    }
}

fn build_encoder(cfg: &FeaturesConfig, kind: FeatureKind, device: &Device) -> Result<Encoder, FeatureError> {
    match (kind, &cfg.image, &cfg.text) {
        (FeatureKind::Image, Some(ImageSource::Siglip { dir }), _) => {
            Ok(Encoder::Image(Box::new(image::ImageEncoder::from_dir(dir, device)?)))
        }
        (FeatureKind::Image, Some(ImageSource::TinySiglip(t)), _) => {
            Ok(Encoder::Image(Box::new(image::ImageEncoder::tiny(t, device)?)))
        }
        (FeatureKind::Text, _, Some(TextSource::Bert { dir })) => {
            Ok(Encoder::Text(Box::new(text::TextEncoder::from_dir(dir, device)?)))
        }
        (FeatureKind::Text, _, Some(TextSource::TinyBert(t))) => {
            Ok(Encoder::Text(Box::new(text::TextEncoder::tiny(t, device)?)))
        }
        _ => Err(FeatureError::Invalid(format!("no encoder configured for {kind} features (features.{kind})"))),
    }
}

/// The cache a batch encoder fills: the encoder's id, the width of its rows, the feature type.
struct CacheTarget<'a> {
    id: &'a str,
    dim: usize,
    kind: FeatureKind,
}

/// A batch of items with their content keys, encoded to `[batch * dim]` values.
type EncodeBatch<'a> = dyn FnMut(&[(&crate::data::Item, String)]) -> Result<Vec<f32>, FeatureError> + 'a;

/// Encodes the items whose content key the cache of `target` lacks, committing a shard every
/// `shard_items` vectors.
fn encode_missing(
    target: &CacheTarget<'_>,
    cfg: &FeaturesConfig,
    ds: &Dataset,
    store: &Store,
    telemetry: &TelemetryConfig,
    encode: &mut EncodeBatch<'_>,
) -> Result<KindReport, FeatureError> {
    let (kind, dim) = (target.kind, target.dim);
    let mut cache = FeatureCache::open(store, target.id, dim)?;
    let mut todo: Vec<(&crate::data::Item, String)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let (mut reused, mut without_input) = (0, 0);
    for item in &ds.items {
        match content_key(kind, item) {
            None => without_input += 1,
            Some(k) if cache.contains(&k) => reused += 1,
            Some(k) => {
                // Identical content (two items with the same image) is encoded once.
                if seen.insert(k.clone()) {
                    todo.push((item, k));
                } else {
                    reused += 1;
                }
            }
        }
    }
    let mut progress = Progress::new(telemetry, &format!("{kind} features"), todo.len() as u64);
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    for batch in todo.chunks(cfg.batch_size) {
        let out = encode(batch)?;
        if let Some(pos) = out.iter().position(|v| !v.is_finite()) {
            let item = &batch[pos / dim].0;
            return Err(FeatureError::Item {
                item: item.id.clone(),
                reason: format!("the {kind} encoder produced {}", out[pos]),
            });
        }
        keys.extend(batch.iter().map(|(_, k)| k.clone()));
        values.extend(out);
        if keys.len() >= cfg.shard_items {
            cache.commit(std::mem::take(&mut keys), std::mem::take(&mut values))?;
        }
        progress.inc(batch.len() as u64);
    }
    cache.commit(keys, values)?;
    progress.finish();
    Ok(KindReport {
        kind,
        encoder: target.id.to_string(),
        dim,
        computed: todo.len(),
        reused,
        without_input,
        seconds: 0.0,
    })
}

fn item_texts(batch: &[(&crate::data::Item, String)]) -> Vec<String> {
    batch.iter().map(|(item, _)| text::item_text(item)).collect()
}

fn read_images(
    store: &Store,
    snapshot_dir: &str,
    batch: &[(&crate::data::Item, String)],
) -> Result<Vec<::image::DynamicImage>, FeatureError> {
    batch.iter().map(|(item, _)| read_image(store, snapshot_dir, item)).collect()
}

fn read_image(
    store: &Store,
    snapshot_dir: &str,
    item: &crate::data::Item,
) -> Result<::image::DynamicImage, FeatureError> {
    let k = key(&[snapshot_dir, item.image.as_deref().unwrap_or_default()]);
    let bytes = store.get_immutable(&k)?;
    ::image::load_from_memory(&bytes)
        .map_err(|e| FeatureError::Item { item: item.id.clone(), reason: format!("image {k} does not decode: {e}") })
}

/// The id under which an imported table is cached: its content.
fn import_id(import: &ImportConfig) -> Result<(String, FeatureTable), FeatureError> {
    let bytes = std::fs::read(&import.file).map_err(|e| load_err(&import.file, e))?;
    let mut h = Sha256::new();
    h.update(&bytes);
    let what = import.file.display().to_string();
    let tf = crate::tensorfile::TensorFile::parse(&bytes, &what).map_err(FeatureTableError::from)?;
    let names = tf.names();
    let name = if names.len() == 1 { names[0].clone() } else { "features".to_string() };
    let (shape, values) = tf.f32(&name).map_err(FeatureTableError::from)?;
    let ids: Vec<String> = match &import.ids {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| load_err(path, e))?;
            h.update(text.as_bytes());
            match serde_json::from_str::<Vec<String>>(&text) {
                Ok(ids) => ids,
                Err(_) => text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect(),
            }
        }
        None => {
            let meta = tf
                .metadata("item_ids")
                .ok_or_else(|| load_err(&import.file, "no `item_ids` metadata: give the ids in a file with `ids:`"))?;
            serde_json::from_str(meta).map_err(|e| load_err(&import.file, format!("`item_ids` metadata: {e}")))?
        }
    };
    if shape.len() != 2 || shape[0] != ids.len() {
        return Err(load_err(&import.file, format!("tensor `{name}` has shape {shape:?} for {} item ids", ids.len())));
    }
    let table = FeatureTable::new(ids, shape[1], values).map_err(|e| load_err(&import.file, e))?;
    Ok((format!("import-{}", hex::encode(&h.finalize()[..8])), table))
}

fn import_table(
    import: &ImportConfig,
    kind: FeatureKind,
    ds: &Dataset,
    store: &Store,
) -> Result<KindReport, FeatureError> {
    let (id, table) = import_id(import)?;
    let mut cache = FeatureCache::open(store, &id, table.dim)?;
    let reused = if cache.is_empty() { 0 } else { table.item_ids.len() };
    if cache.is_empty() {
        let keys = table.item_ids.iter().map(|i| format!("id:{i}")).collect();
        cache.commit(keys, table.values.clone())?;
    }
    let known: std::collections::HashSet<&str> = table.item_ids.iter().map(String::as_str).collect();
    let without_input = ds.items.iter().filter(|i| !known.contains(i.id.as_str())).count();
    Ok(KindReport {
        kind,
        encoder: id,
        dim: table.dim,
        computed: if reused == 0 { table.item_ids.len() } else { 0 },
        reused,
        without_input,
        seconds: 0.0,
    })
}

fn load_cf_table(store: &Store, k: &str) -> Result<FeatureTable, FeatureError> {
    let bytes = store.get_opt(k)?.ok_or_else(|| {
        FeatureError::Invalid(format!(
            "no CF table at {k}: train SASRec first (`illmrec train --job FILE --model sasrec`)"
        ))
    })?;
    Ok(FeatureTable::from_bytes(&bytes, k)?)
}

/// Finds the cached vector of a content key.
type Lookup = Box<dyn Fn(&str) -> Option<Vec<f32>>>;

/// One feature type for every item of a dataset, as the model reads it.
#[derive(Debug, Clone)]
pub struct ItemFeatures {
    pub kind: FeatureKind,
    pub encoder: String,
    pub dim: usize,
    /// `(num_items + 1) * dim` values; row i is item i, row 0 (padding) is zero, as are rows of items
    /// without this feature.
    pub values: Vec<f32>,
    /// `present[i]`: item i has this feature.
    pub present: Vec<bool>,
}

impl ItemFeatures {
    pub fn missing(&self) -> usize {
        self.present.iter().skip(1).filter(|p| !**p).count()
    }
}

/// The cached features of `kind` for every item of `ds` (the CF feature from the item table at
/// `cf_table`). Items without an image are allowed (they fall back to the text feature); any other
/// gap is an error naming the items.
pub fn load(
    cfg: &FeaturesConfig,
    kind: FeatureKind,
    ds: &Dataset,
    store: &Store,
    cf_table: &str,
) -> Result<ItemFeatures, FeatureError> {
    // Imported tables are keyed by item id, whatever the kind (`import_table`).
    let imported = import_of(cfg, kind).is_some();
    let (encoder, dim, lookup): (String, usize, Lookup) = match (kind, import_of(cfg, kind)) {
        (_, Some(import)) => {
            let (id, table) = import_id(import)?;
            let cache = FeatureCache::open(store, &id, table.dim)?;
            (id, table.dim, Box::new(move |k: &str| cache.get(k).map(<[f32]>::to_vec)))
        }
        (FeatureKind::Cf, None) => {
            let table = load_cf_table(store, cf_table)?;
            let rows: std::collections::HashMap<String, usize> =
                table.item_ids.iter().enumerate().map(|(r, id)| (format!("id:{id}"), r)).collect();
            let dim = table.dim;
            (format!("table {cf_table}"), dim, Box::new(move |k: &str| rows.get(k).map(|&r| table.row(r).to_vec())))
        }
        (kind, None) => {
            let (id, dim) = encoder_identity(cfg, kind)?;
            let cache = FeatureCache::open(store, &id, dim)?;
            (id, dim, Box::new(move |k: &str| cache.get(k).map(<[f32]>::to_vec)))
        }
    };
    assemble(kind, encoder, dim, ds, |item| {
        let key = if imported { Some(format!("id:{}", item.id)) } else { content_key(kind, item) };
        key.and_then(|k| lookup(&k))
    })
}

/// The `kind` rows of every item of `ds` as `row_of` finds them. Items without an image are allowed
/// (they fall back to the text feature); any other gap is an error naming the items.
fn assemble(
    kind: FeatureKind,
    encoder: String,
    dim: usize,
    ds: &Dataset,
    row_of: impl Fn(&crate::data::Item) -> Option<Vec<f32>>,
) -> Result<ItemFeatures, FeatureError> {
    let n = ds.num_items();
    let mut values = vec![0f32; (n + 1) * dim];
    let mut present = vec![false; n + 1];
    let mut missing = Vec::new();
    for item in &ds.items {
        let i = item.index as usize;
        match row_of(item) {
            Some(v) => {
                values[i * dim..(i + 1) * dim].copy_from_slice(&v);
                present[i] = true;
            }
            None if kind == FeatureKind::Image => {}
            None => missing.push(item.id.clone()),
        }
    }
    if !missing.is_empty() {
        return Err(FeatureError::Missing {
            kind,
            count: missing.len(),
            examples: missing.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
            hint: "run `illmrec features --job FILE` (or check the imported table's ids)".into(),
        });
    }
    Ok(ItemFeatures { kind, encoder, dim, values, present })
}

/// The cache id and dimension of the encoder configured for `kind`, without loading its weights.
fn encoder_identity(cfg: &FeaturesConfig, kind: FeatureKind) -> Result<(String, usize), FeatureError> {
    let read_config = |dir: &Path| -> Result<serde_json::Value, FeatureError> {
        let p = dir.join("config.json");
        serde_json::from_str(&std::fs::read_to_string(&p).map_err(|e| load_err(&p, e))?).map_err(|e| load_err(&p, e))
    };
    let hidden = |v: &serde_json::Value, dir: &Path| {
        v.get("hidden_size")
            .and_then(|h| h.as_u64())
            .map(|h| h as usize)
            .ok_or_else(|| load_err(&dir.join("config.json"), "no hidden_size"))
    };
    match (kind, &cfg.image, &cfg.text) {
        (FeatureKind::Image, Some(ImageSource::Siglip { dir }), _) => {
            let raw = read_config(dir)?;
            let vision = raw.get("vision_config").cloned().unwrap_or(raw);
            Ok((image::siglip_id(dir)?, hidden(&vision, dir)?))
        }
        (FeatureKind::Image, Some(ImageSource::TinySiglip(t)), _) => Ok((image::tiny_siglip_id(t), t.hidden)),
        (FeatureKind::Text, _, Some(TextSource::Bert { dir })) => {
            Ok((text::bert_id(dir)?, hidden(&read_config(dir)?, dir)?))
        }
        (FeatureKind::Text, _, Some(TextSource::TinyBert(t))) => Ok((text::tiny_bert_id(t), t.hidden)),
        _ => Err(FeatureError::Invalid(format!("no encoder configured for {kind} features (features.{kind})"))),
    }
}

#[cfg(test)]
mod tests;
