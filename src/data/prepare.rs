//! `illmrec prepare`: raw data -> filtered, indexed, split snapshot with stored negatives.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::config::{DataConfig, SourceConfig};
use super::dataset::{Dataset, Item};
use super::error::{DataError, Result};
use super::ingest::{BadRecords, RawData, RawInteraction};
use super::kcore::{k_core, Counts};
use super::snapshot::{self, Contents, Manifest};
use crate::store::{key, Store};
use crate::telemetry::{Progress, TelemetryConfig};

/// What `prepare` did, for the terminal.
#[derive(Debug, Serialize)]
pub struct PrepareReport {
    pub reused: bool,
    pub manifest: Manifest,
}

impl std::fmt::Display for PrepareReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.manifest;
        let verb = if self.reused { "already prepared (reused)" } else { "prepared" };
        writeln!(f, "dataset {} snapshot {}: {verb}", m.name, m.key)?;
        if let Some(p) = &m.parent {
            writeln!(f, "  grew from snapshot {p}")?;
        }
        writeln!(f, "  {:<24} {:>9} {:>9} {:>13}", "", "users", "items", "interactions")?;
        for (label, c) in [("read", m.counts_read), ("after filtering", m.counts)] {
            writeln!(f, "  {:<24} {:>9} {:>9} {:>13}", label, c.users, c.items, c.interactions)?;
        }
        writeln!(
            f,
            "  items with image: {}, without metadata: {}, dropped for no image: {}",
            m.items_with_image, m.items_without_metadata, m.items_dropped_without_image
        )?;
        writeln!(f, "  negatives per user and split: {} (seed {})", m.negatives_per_user, m.seed)?;
        if m.skipped.total() == 0 {
            write!(f, "  skipped records: none")?;
        } else {
            write!(f, "  skipped records: {}", m.skipped.total())?;
            for (kind, n) in &m.skipped.counts {
                write!(f, "\n    {kind}: {n}")?;
            }
            for ex in &m.skipped.examples {
                write!(f, "\n    e.g. {ex}")?;
            }
        }
        Ok(())
    }
}

pub fn prepare(name: &str, cfg: &DataConfig, store: &Store, telemetry: &TelemetryConfig) -> Result<PrepareReport> {
    let _stage = tracing::info_span!("stage", stage = "prepare", dataset = name).entered();
    let mut bad = BadRecords::new(cfg.on_bad_record);
    let mut raw = match &cfg.source {
        SourceConfig::Recbole { dir, name } => super::recbole::read(dir, name, &mut bad)?,
        SourceConfig::Amazon { reviews, meta, images } => {
            super::amazon::read(reviews, meta, images.as_deref(), &mut bad)?
        }
        SourceConfig::Sequences { file, items, images } => {
            super::sequences::read(file, items, images.as_deref(), &mut bad)?
        }
    };
    if let Some(path) = &cfg.candidates {
        raw.sources.push(super::ingest::read_source(path)?.1);
    }
    let snapshot_key = content_key(cfg, &raw);
    let previous = snapshot::latest(store, name)?;
    if let Some(manifest) = snapshot::read_manifest(store, name, &snapshot_key)? {
        if previous.as_deref() == Some(snapshot_key.as_str()) {
            return Ok(PrepareReport { reused: true, manifest });
        }
    }
    let counts_read = Counts::of(&raw.interactions);
    let user_min = cfg.k_core.max(cfg.min_user_interactions);
    let mut kept = k_core(raw.interactions, user_min, cfg.k_core);

    // Images are checked only for items that survive the first k-core: decoding is the costly part.
    let candidates: BTreeSet<&str> = kept.iter().map(|i| i.item.as_str()).collect();
    let readable = check_images(&raw.images, &candidates, &mut bad, telemetry)?;
    let mut dropped_for_image = 0;
    if cfg.require_image {
        dropped_for_image = candidates.iter().filter(|i| !readable.contains_key(**i)).count();
        kept.retain(|i| readable.contains_key(&i.item));
        kept = k_core(kept, user_min, cfg.k_core);
    }
    let counts = Counts::of(&kept);
    if counts.interactions == 0 {
        return Err(DataError::Invalid(format!(
            "nothing is left after filtering ({} users, {} items, {} interactions read; k_core {}, min_user_interactions {}, require_image {})",
            counts_read.users, counts_read.items, counts_read.interactions, cfg.k_core, cfg.min_user_interactions, cfg.require_image
        )));
    }

    let (items, user_ids, sequences, timestamps) = index(&kept, &raw.items, &readable);
    let negatives = super::negatives::sample(&sequences, items.len(), cfg.negatives, cfg.seed)?;
    let mut ds = Dataset {
        name: name.to_string(),
        key: snapshot_key.clone(),
        items,
        user_ids,
        sequences,
        negatives,
        candidates: vec![],
    };
    // Fixed lists are checked against what filtering left: every id must still be there.
    if let Some(path) = &cfg.candidates {
        ds.candidates = super::candidates::read(path, &ds)?;
    }
    let Dataset { items, user_ids, sequences, negatives, candidates, .. } = &ds;
    let manifest = Manifest {
        format: snapshot::FORMAT,
        name: name.to_string(),
        key: snapshot_key.clone(),
        // The version this one replaces as LATEST: the catalog it grew from.
        parent: previous.filter(|p| *p != snapshot_key),
        seed: cfg.seed,
        config: serde_json::to_value(cfg).map_err(|e| DataError::Invalid(e.to_string()))?,
        sources: raw.sources.clone(),
        counts_read,
        counts,
        items_without_metadata: items.iter().filter(|i| !raw.items.contains_key(&i.id)).count(),
        items_with_image: items.iter().filter(|i| i.image.is_some()).count(),
        items_dropped_without_image: dropped_for_image,
        skipped: bad.report,
        negatives_per_user: cfg.negatives,
        candidate_lists: candidates.len(),
        split: "leave-one-out by time: train = items[:-2], valid target = items[-2], test target = items[-1]".into(),
    };
    copy_images(store, &manifest, items, &readable, telemetry)?;
    snapshot::write(
        store,
        Contents { manifest: &manifest, items, user_ids, sequences, timestamps: &timestamps, negatives, candidates },
    )?;
    Ok(PrepareReport { reused: false, manifest })
}

/// Hash of what determines the snapshot: the format, the data section and the sources' hashes.
fn content_key(cfg: &DataConfig, raw: &RawData) -> String {
    let mut h = Sha256::new();
    h.update(snapshot::FORMAT.to_le_bytes());
    h.update(serde_json::to_vec(cfg).unwrap_or_default());
    for s in &raw.sources {
        h.update(s.sha256.as_bytes());
    }
    hex::encode(&h.finalize()[..8])
}

/// A source image that decoded: where it is and the sha256 of its bytes (its content key).
pub struct ReadableImage {
    path: PathBuf,
    sha256: String,
}

/// Decodes the images of `items`; unreadable ones go through the bad-record policy.
fn check_images(
    images: &BTreeMap<String, PathBuf>,
    items: &BTreeSet<&str>,
    bad: &mut BadRecords,
    telemetry: &TelemetryConfig,
) -> Result<BTreeMap<String, ReadableImage>> {
    let todo: Vec<(&String, &PathBuf)> = images.iter().filter(|(id, _)| items.contains(id.as_str())).collect();
    let mut progress = Progress::new(telemetry, "images", todo.len() as u64);
    let mut ok = BTreeMap::new();
    for (id, path) in todo {
        match decode_image(path) {
            Ok(sha256) => {
                ok.insert(id.clone(), ReadableImage { path: path.clone(), sha256 });
            }
            Err(reason) => bad.bad_file(path, "unreadable image", reason)?,
        }
        progress.inc(1);
    }
    progress.finish();
    Ok(ok)
}

/// Decodes an image fully (a truncated file fails here, not in a later stage) and hashes its bytes.
fn decode_image(path: &Path) -> std::result::Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let reader =
        image::ImageReader::new(std::io::Cursor::new(&bytes)).with_guessed_format().map_err(|e| e.to_string())?;
    reader.decode().map_err(|e| e.to_string())?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

fn copy_images(
    store: &Store,
    m: &Manifest,
    items: &[Item],
    readable: &BTreeMap<String, ReadableImage>,
    telemetry: &TelemetryConfig,
) -> Result<()> {
    let base = snapshot::dir(&m.name, &m.key);
    let mut progress = Progress::new(telemetry, "copy images", m.items_with_image as u64);
    for it in items {
        if let (Some(image_key), Some(img)) = (&it.image, readable.get(&it.id)) {
            let path = &img.path;
            let bytes = std::fs::read(path).map_err(|source| DataError::Io { file: path.clone(), source })?;
            store.put_new(&key(&[&base, image_key]), bytes)?;
            progress.inc(1);
        }
    }
    progress.finish();
    Ok(())
}

type Indexed = (Vec<Item>, Vec<String>, Vec<Vec<u32>>, Vec<Vec<f64>>);

/// Items get indices 1..=N in id order, users 0..U in id order; sequences are sorted by time, ties
/// kept in file order.
fn index(
    kept: &[RawInteraction],
    metas: &BTreeMap<String, super::ingest::ItemMeta>,
    readable: &BTreeMap<String, ReadableImage>,
) -> Indexed {
    let item_ids: BTreeSet<&str> = kept.iter().map(|i| i.item.as_str()).collect();
    let item_index: HashMap<&str, u32> = item_ids.iter().enumerate().map(|(n, id)| (*id, n as u32 + 1)).collect();
    let items = item_ids
        .iter()
        .map(|id| {
            let index = item_index[id];
            // Named by content, so the image feature cache can key on the file name.
            let image = readable.get(*id).map(|img| {
                let ext = img.path.extension().and_then(|e| e.to_str()).unwrap_or("img").to_ascii_lowercase();
                format!("images/{}.{ext}", img.sha256)
            });
            Item { index, id: id.to_string(), meta: metas.get(*id).cloned().unwrap_or_default(), image }
        })
        .collect();
    let mut per_user: BTreeMap<&str, Vec<(f64, u32)>> = BTreeMap::new();
    for it in kept {
        per_user.entry(&it.user).or_default().push((it.timestamp, item_index[it.item.as_str()]));
    }
    let mut user_ids = Vec::new();
    let mut sequences = Vec::new();
    let mut timestamps = Vec::new();
    for (user, mut events) in per_user {
        events.sort_by(|a, b| a.0.total_cmp(&b.0)); // stable: equal timestamps keep file order
        user_ids.push(user.to_string());
        timestamps.push(events.iter().map(|e| e.0).collect());
        sequences.push(events.iter().map(|e| e.1).collect());
    }
    (items, user_ids, sequences, timestamps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractional_timestamps_order_a_users_events_and_ties_keep_file_order() {
        let at = |item: &str, timestamp: f64| RawInteraction { user: "u".into(), item: item.into(), timestamp };
        let kept = [at("10", 1.7), at("11", 1.2), at("12", 1.7)];
        let (_, _, sequences, timestamps) = index(&kept, &BTreeMap::new(), &BTreeMap::new());
        // Items are indexed by id (10 -> 1, 11 -> 2, 12 -> 3).
        assert_eq!(sequences[0], [2, 1, 3]);
        assert_eq!(timestamps[0], [1.2, 1.7, 1.7]);
    }
}
