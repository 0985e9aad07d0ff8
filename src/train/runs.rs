//! A run's files under the storage root:
//!
//! ```text
//! runs/<run-id>/checkpoints/<step>-<attempt>/<file>...   weights, optimizer state (safetensors)
//! runs/<run-id>/checkpoints/<step>-<attempt>/state.json  the checkpoint's manifest: state, file list, parent
//! runs/<run-id>/checkpoints/LATEST                       the name of the committed folder; written last
//! runs/<run-id>/checkpoints/BEST                         the folder of the best validation so far
//! runs/<run-id>/features/cf.safetensors                  SASRec's item table (the CF feature)
//! runs/<run-id>/report/...                               evaluation results, training log
//! ```
//! Each attempt to save writes into a folder of its own (`<attempt>` is unique to it), payload first,
//! then the manifest, then LATEST, moved only from the value this writer read (a conditional put where
//! the server honours it). A checkpoint exists only once LATEST names it: an attempt that dies midway
//! leaves an orphan folder and the previous checkpoint in force. After a commit the last `keep`
//! committed checkpoints stay, and the one BEST names; older folders and older orphans are deleted.
//! BEST moves the way LATEST does, right after it, when the saved checkpoint improved the validation.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

use super::{Result, TrainError};
use crate::store::{attempt_id, key, Store};

pub struct Checkpoint {
    pub step: u64,
    /// The folder below `checkpoints/` that LATEST names.
    pub name: String,
    pub state: serde_json::Value,
    files: HashMap<String, Bytes>,
}

impl Checkpoint {
    /// A file of the checkpoint, by name.
    pub fn file(&self, name: &str) -> Result<&Bytes> {
        self.files
            .get(name)
            .ok_or_else(|| TrainError::Invalid(format!("checkpoint {} has no file `{name}`", self.name)))
    }
}

pub fn dir(run_id: &str) -> String {
    key(&["runs", run_id])
}

fn checkpoints_dir(run_id: &str) -> String {
    key(&[&dir(run_id), "checkpoints"])
}

fn latest_key(run_id: &str) -> String {
    key(&[&checkpoints_dir(run_id), "LATEST"])
}

fn best_key(run_id: &str) -> String {
    key(&[&checkpoints_dir(run_id), "BEST"])
}

/// Which checkpoint of a run to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Which {
    /// BEST where the run has one (it validated), else LATEST.
    #[default]
    Best,
    Latest,
    /// The committed checkpoint of this step, if retention kept it.
    Step(u64),
}

impl FromStr for Which {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "best" => Ok(Which::Best),
            "latest" => Ok(Which::Latest),
            _ => s.parse().map(Which::Step).map_err(|_| format!("`{s}` is not best, latest or a step number")),
        }
    }
}

impl fmt::Display for Which {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Which::Best => f.write_str("best"),
            Which::Latest => f.write_str("latest"),
            Which::Step(s) => write!(f, "step {s}"),
        }
    }
}

/// The step a checkpoint folder holds: `0000000030-1a2b3c…` (or a bare step, as older runs wrote).
fn step_of(folder: &str) -> Option<u64> {
    folder.split('-').next()?.parse().ok()
}

/// Writes the files and state of `step` into a folder of this attempt, then moves LATEST to it (and
/// BEST, when `best`), then applies retention. A failure before LATEST moves leaves the previous
/// checkpoint in force.
pub fn save(
    store: &Store,
    run_id: &str,
    step: u64,
    files: Vec<(&str, Vec<u8>)>,
    state: &serde_json::Value,
    keep: usize,
    best: bool,
) -> Result<()> {
    let _span = tracing::info_span!("checkpoint.save", run = run_id, step = step as i64).entered();
    let seen = store.get_pointer(&latest_key(run_id))?;
    let folder = format!("{step:010}-{}", attempt_id());
    let d = key(&[&checkpoints_dir(run_id), &folder]);
    let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    // The folder is this attempt's alone, so payloads need no create-only put and large ones go up
    // in parts (each retried on its own).
    for (name, bytes) in files {
        store.put(&key(&[&d, name]), bytes)?;
    }
    let mut state = state.clone();
    state["files"] = serde_json::json!(names);
    state["parent"] = serde_json::json!(seen.as_ref().map(|(name, _)| name));
    let state_bytes = serde_json::to_vec_pretty(&state).map_err(|e| TrainError::Invalid(e.to_string()))?;
    store.put_new(&key(&[&d, "state.json"]), state_bytes)?;
    store.put_pointer(&latest_key(run_id), &folder, seen.as_ref().map(|(_, v)| v))?;
    if best {
        point_best(store, run_id, &folder)?;
    }
    prune(store, run_id, &folder, keep)
}

/// Points BEST at a committed checkpoint folder, unless it names it already.
pub fn point_best(store: &Store, run_id: &str, folder: &str) -> Result<()> {
    let seen = store.get_pointer(&best_key(run_id))?;
    if seen.as_ref().map(|(name, _)| name.as_str()) != Some(folder) {
        store.put_pointer(&best_key(run_id), folder, seen.as_ref().map(|(_, v)| v))?;
    }
    Ok(())
}

/// Keeps the `keep` newest committed checkpoints up to `latest` and the one BEST names; deletes older
/// ones and orphans (folders without a manifest) older than `latest`. Newer folders may be another
/// attempt's work in progress and are left alone.
fn prune(store: &Store, run_id: &str, latest: &str, keep: usize) -> Result<()> {
    let prefix = checkpoints_dir(run_id);
    let best = store.get_string(&best_key(run_id))?;
    let mut folders: HashMap<String, (Vec<String>, bool)> = HashMap::new();
    for k in store.list(&prefix)? {
        let Some(rest) = k.strip_prefix(&prefix).map(|r| r.trim_start_matches('/')) else { continue };
        let Some((folder, file)) = rest.split_once('/') else { continue };
        let entry = folders.entry(folder.to_string()).or_default();
        entry.1 |= file == "state.json";
        entry.0.push(k);
    }
    let mut committed: Vec<&String> =
        folders.iter().filter(|(f, (_, done))| *done && f.as_str() <= latest).map(|(f, _)| f).collect();
    committed.sort();
    let mut kept: Vec<&String> = committed.iter().rev().take(keep.max(1)).copied().collect();
    kept.extend(committed.iter().copied().filter(|f| Some(f.as_str()) == best.as_deref()));
    for (folder, (keys, _)) in &folders {
        if folder.as_str() < latest && !kept.contains(&folder) {
            for k in keys {
                store.delete(k)?;
            }
        }
    }
    Ok(())
}

/// Steps that have a committed-looking checkpoint folder (one with a manifest), ascending.
pub fn steps(store: &Store, run_id: &str) -> Result<Vec<u64>> {
    let prefix = checkpoints_dir(run_id);
    let mut out: Vec<u64> = store
        .list(&prefix)?
        .iter()
        .filter_map(|k| {
            let (folder, file) = k.strip_prefix(&prefix)?.trim_start_matches('/').split_once('/')?;
            if file == "state.json" {
                step_of(folder)
            } else {
                None
            }
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Deletes every checkpoint of a run (a fresh start). The pointers go first: a clear cut short
/// leaves folders nothing names, never a pointer to a deleted folder.
pub fn clear(store: &Store, run_id: &str) -> Result<()> {
    for pointer in [latest_key(run_id), best_key(run_id)] {
        store.delete(&pointer)?;
    }
    for k in store.list(&checkpoints_dir(run_id))? {
        store.delete(&k)?;
    }
    Ok(())
}

/// Whether LATEST names a checkpoint.
pub fn has_checkpoint(store: &Store, run_id: &str) -> Result<bool> {
    Ok(store.get_opt(&latest_key(run_id))?.is_some())
}

/// The checkpoint LATEST names, if any.
pub fn load_latest(store: &Store, run_id: &str) -> Result<Option<Checkpoint>> {
    let _span = tracing::info_span!("checkpoint.load", run = run_id).entered();
    let Some(text) = store.get_string(&latest_key(run_id))? else { return Ok(None) };
    Ok(Some(load_folder(store, run_id, &text)?))
}

/// The checkpoint `which` names, if the run has one: BEST (falling back to LATEST for runs that
/// never validated), LATEST, or the committed folder of a step.
pub fn load(store: &Store, run_id: &str, which: Which) -> Result<Option<Checkpoint>> {
    match which {
        Which::Latest => load_latest(store, run_id),
        Which::Best => match store.get_string(&best_key(run_id))? {
            Some(text) => {
                let _span = tracing::info_span!("checkpoint.load", run = run_id, which = "best").entered();
                Ok(Some(load_folder(store, run_id, &text)?))
            }
            None => load_latest(store, run_id),
        },
        Which::Step(step) => {
            let prefix = checkpoints_dir(run_id);
            let mut folders: Vec<String> = store
                .list(&prefix)?
                .iter()
                .filter_map(|k| {
                    let (folder, file) = k.strip_prefix(&prefix)?.trim_start_matches('/').split_once('/')?;
                    (file == "state.json" && step_of(folder) == Some(step)).then(|| folder.to_string())
                })
                .collect();
            folders.sort();
            match folders.last() {
                Some(f) => Ok(Some(load_folder(store, run_id, f)?)),
                None => Err(TrainError::Invalid(format!(
                    "run {run_id} has no checkpoint of step {step} (kept: {:?})",
                    steps(store, run_id)?
                ))),
            }
        }
    }
}

/// A committed checkpoint folder, by the name a pointer holds.
fn load_folder(store: &Store, run_id: &str, text: &str) -> Result<Checkpoint> {
    let pointer = key(&[&checkpoints_dir(run_id), text]);
    let step = step_of(text)
        .ok_or_else(|| TrainError::Invalid(format!("{pointer}: `{text}` is not a checkpoint folder name")))?;
    // Older runs wrote the bare step into LATEST and `<step:010>` folders.
    let name = if text.contains('-') { text.to_string() } else { format!("{step:010}") };
    let d = key(&[&checkpoints_dir(run_id), &name]);
    let state_key = key(&[&d, "state.json"]);
    let state: serde_json::Value = serde_json::from_slice(&store.get_immutable(&state_key)?)
        .map_err(|e| TrainError::Invalid(format!("{state_key}: {e}")))?;
    let mut files = HashMap::new();
    for file in state["files"].as_array().into_iter().flatten().filter_map(|n| n.as_str()) {
        files.insert(file.to_string(), store.get_immutable(&key(&[&d, file]))?);
    }
    Ok(Checkpoint { step, name, state, files })
}

pub fn put_report(store: &Store, run_id: &str, name: &str, bytes: Vec<u8>) -> Result<()> {
    Ok(store.put(&key(&[&dir(run_id), "report", name]), bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_is_the_commit_point_and_old_checkpoints_are_pruned() {
        let store = Store::open("memory://").unwrap();
        assert!(load_latest(&store, "r").unwrap().is_none());
        for step in [10, 20, 30] {
            save(&store, "r", step, vec![("w.bin", vec![step as u8])], &serde_json::json!({"s": step}), 2, false)
                .unwrap();
        }
        assert_eq!(steps(&store, "r").unwrap(), vec![20, 30]);
        let c = load_latest(&store, "r").unwrap().unwrap();
        assert_eq!((c.step, c.state["s"].as_u64(), &c.file("w.bin").unwrap()[..]), (30, Some(30), &[30u8][..]));
        assert!(c.state["parent"].as_str().unwrap().starts_with("0000000020-"), "{}", c.state["parent"]);
        // An attempt that died before its manifest and LATEST (payload only) is not loaded, and the
        // next commit removes it.
        store.put("runs/r/checkpoints/0000000040-dead/w.bin", vec![40u8]).unwrap();
        assert_eq!(load_latest(&store, "r").unwrap().unwrap().step, 30);
        save(&store, "r", 50, vec![("w.bin", vec![50])], &serde_json::json!({}), 2, false).unwrap();
        let left = store.list("runs/r/checkpoints").unwrap();
        assert!(!left.iter().any(|k| k.contains("-dead/")), "{left:?}");
        assert_eq!(steps(&store, "r").unwrap(), vec![30, 50]);
        clear(&store, "r").unwrap();
        assert!(load_latest(&store, "r").unwrap().is_none());
    }

    #[test]
    fn best_moves_only_on_improvement_and_survives_retention() {
        let store = Store::open("memory://").unwrap();
        let state = serde_json::json!({});
        // Without BEST, `best` loads LATEST.
        save(&store, "r", 10, vec![("w.bin", vec![10])], &state, 2, false).unwrap();
        assert_eq!(load(&store, "r", Which::Best).unwrap().unwrap().step, 10);
        save(&store, "r", 20, vec![("w.bin", vec![20])], &state, 2, true).unwrap();
        for step in [30, 40, 50] {
            save(&store, "r", step, vec![("w.bin", vec![step as u8])], &state, 2, false).unwrap();
        }
        // Retention keeps the last two and the best.
        assert_eq!(steps(&store, "r").unwrap(), vec![20, 40, 50]);
        let best = load(&store, "r", Which::Best).unwrap().unwrap();
        assert_eq!((best.step, &best.file("w.bin").unwrap()[..]), (20, &[20u8][..]));
        assert_eq!(load(&store, "r", Which::Latest).unwrap().unwrap().step, 50);
        assert_eq!(load(&store, "r", Which::Step(40)).unwrap().unwrap().step, 40);
        let gone = load(&store, "r", Which::Step(30)).err().unwrap().to_string();
        assert!(gone.contains("no checkpoint of step 30 (kept: [20, 40, 50])"), "{gone}");
        save(&store, "r", 60, vec![("w.bin", vec![60])], &state, 2, true).unwrap();
        assert_eq!(steps(&store, "r").unwrap(), vec![50, 60]);
        assert_eq!(load(&store, "r", Which::Best).unwrap().unwrap().step, 60);
        assert_eq!("best".parse::<Which>().unwrap(), Which::Best);
        assert_eq!("120".parse::<Which>().unwrap(), Which::Step(120));
        assert!("first".parse::<Which>().is_err());
    }

    #[test]
    fn a_second_writer_from_the_same_starting_point_is_refused() {
        // The in-memory store honours conditional puts the way S3 does once probed.
        let store = Store::open("memory://").unwrap();
        let seen = store.get_pointer("p/LATEST").unwrap();
        store.put_pointer("p/LATEST", "a", seen.as_ref().map(|(_, v)| v)).unwrap();
        let (value, v1) = store.get_pointer("p/LATEST").unwrap().unwrap();
        assert_eq!(value, "a");
        store.put_pointer("p/LATEST", "b", Some(&v1)).unwrap();
        assert!(store.honours_conditional_put());
        let err = store.put_pointer("p/LATEST", "c", Some(&v1)).unwrap_err();
        assert!(matches!(err, crate::store::StoreError::Conflict { .. }), "{err}");
    }
}
