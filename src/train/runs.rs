//! A run's files under the storage root:
//!
//! ```text
//! runs/<run-id>/checkpoints/<step>/<file>...   weights, optimizer state (safetensors), state.json
//! runs/<run-id>/checkpoints/LATEST             the step; written last
//! runs/<run-id>/features/cf.safetensors        SASRec's item table (the CF feature)
//! runs/<run-id>/report/...                     evaluation results, training log
//! ```
//! A checkpoint exists only once LATEST names it: a run stopped while writing one leaves the previous
//! checkpoint in force. The last `keep` checkpoints are kept; older ones are deleted after the commit.

use std::collections::HashMap;

use bytes::Bytes;

use super::{Result, TrainError};
use crate::store::{key, Store};

pub struct Checkpoint {
    pub step: u64,
    pub state: serde_json::Value,
    files: HashMap<String, Bytes>,
}

impl Checkpoint {
    /// A file of the checkpoint, by name.
    pub fn file(&self, name: &str) -> Result<&Bytes> {
        self.files
            .get(name)
            .ok_or_else(|| TrainError::Invalid(format!("checkpoint {} has no file `{name}`", self.step)))
    }
}

pub fn dir(run_id: &str) -> String {
    key(&["runs", run_id])
}

fn checkpoints_dir(run_id: &str) -> String {
    key(&[&dir(run_id), "checkpoints"])
}

fn step_dir(run_id: &str, step: u64) -> String {
    key(&[&checkpoints_dir(run_id), &format!("{step:010}")])
}

/// Writes the files and state of `step`, points LATEST at it, then deletes all but the last `keep`
/// checkpoints.
pub fn save(
    store: &Store,
    run_id: &str,
    step: u64,
    files: Vec<(&str, Vec<u8>)>,
    state: &serde_json::Value,
    keep: usize,
) -> Result<()> {
    let d = step_dir(run_id, step);
    let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    for (name, bytes) in files {
        store.put(&key(&[&d, name]), bytes)?;
    }
    let mut state = state.clone();
    state["files"] = serde_json::json!(names);
    let state_bytes = serde_json::to_vec_pretty(&state).map_err(|e| TrainError::Invalid(e.to_string()))?;
    store.put(&key(&[&d, "state.json"]), state_bytes)?;
    store.put(&key(&[&checkpoints_dir(run_id), "LATEST"]), step.to_string())?;
    let mut steps = steps(store, run_id)?;
    steps.retain(|&s| s != step);
    let drop = steps.len().saturating_sub(keep.saturating_sub(1));
    for old in &steps[..drop] {
        for k in store.list(&step_dir(run_id, *old))? {
            store.delete(&k)?;
        }
    }
    Ok(())
}

/// Steps that have a checkpoint folder (committed or not), ascending.
pub fn steps(store: &Store, run_id: &str) -> Result<Vec<u64>> {
    let prefix = checkpoints_dir(run_id);
    let mut out: Vec<u64> = store
        .list(&prefix)?
        .iter()
        .filter_map(|k| k.strip_prefix(&prefix)?.trim_start_matches('/').split('/').next()?.parse().ok())
        .collect();
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Deletes every checkpoint of a run (a fresh start).
pub fn clear(store: &Store, run_id: &str) -> Result<()> {
    for k in store.list(&checkpoints_dir(run_id))? {
        store.delete(&k)?;
    }
    Ok(())
}

/// The checkpoint LATEST names, if any.
pub fn load_latest(store: &Store, run_id: &str) -> Result<Option<Checkpoint>> {
    let latest_key = key(&[&checkpoints_dir(run_id), "LATEST"]);
    let Some(text) = store.get_string(&latest_key)? else { return Ok(None) };
    let step: u64 =
        text.parse().map_err(|_| TrainError::Invalid(format!("{latest_key}: `{text}` is not a step number")))?;
    let d = step_dir(run_id, step);
    let state_key = key(&[&d, "state.json"]);
    let state: serde_json::Value = serde_json::from_slice(&store.get(&state_key)?)
        .map_err(|e| TrainError::Invalid(format!("{state_key}: {e}")))?;
    let mut files = HashMap::new();
    for name in state["files"].as_array().into_iter().flatten().filter_map(|n| n.as_str()) {
        files.insert(name.to_string(), store.get(&key(&[&d, name]))?);
    }
    Ok(Some(Checkpoint { step, state, files }))
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
            save(&store, "r", step, vec![("w.bin", vec![step as u8])], &serde_json::json!({"s": step}), 2).unwrap();
        }
        assert_eq!(steps(&store, "r").unwrap(), vec![20, 30]);
        let c = load_latest(&store, "r").unwrap().unwrap();
        assert_eq!((c.step, c.state["s"].as_u64(), &c.file("w.bin").unwrap()[..]), (30, Some(30), &[30u8][..]));
        // A checkpoint written without its LATEST (a crash mid-save) is not the one loaded.
        store.put("runs/r/checkpoints/0000000040/w.bin", vec![40u8]).unwrap();
        assert_eq!(load_latest(&store, "r").unwrap().unwrap().step, 30);
        clear(&store, "r").unwrap();
        assert!(load_latest(&store, "r").unwrap().is_none());
    }
}
