//! A run's files under the storage root:
//!
//! ```text
//! runs/<run-id>/checkpoints/<step>/model.safetensors   weights
//! runs/<run-id>/checkpoints/<step>/state.json          what the weights are: model, dataset key, ...
//! runs/<run-id>/checkpoints/LATEST                     the step; written last
//! runs/<run-id>/features/cf.safetensors                SASRec's item table (the CF feature)
//! runs/<run-id>/report/...                             evaluation results
//! ```

use crate::store::{key, Store, StoreError};

pub struct Checkpoint {
    pub step: u64,
    pub tensors: bytes::Bytes,
    pub state: serde_json::Value,
}

pub fn dir(run_id: &str) -> String {
    key(&["runs", run_id])
}

fn step_dir(run_id: &str, step: u64) -> String {
    key(&[&dir(run_id), "checkpoints", &format!("{step:010}")])
}

/// Writes the weights and state of `step`, then points LATEST at it.
pub fn save(
    store: &Store,
    run_id: &str,
    step: u64,
    tensors: Vec<u8>,
    state: &serde_json::Value,
) -> Result<(), StoreError> {
    let d = step_dir(run_id, step);
    store.put(&key(&[&d, "model.safetensors"]), tensors)?;
    store.put(&key(&[&d, "state.json"]), serde_json::to_vec_pretty(state).unwrap_or_default())?;
    store.put(&key(&[&dir(run_id), "checkpoints", "LATEST"]), step.to_string())
}

/// The checkpoint LATEST names, if any.
pub fn load_latest(store: &Store, run_id: &str) -> Result<Option<Checkpoint>, crate::train::TrainError> {
    let latest_key = key(&[&dir(run_id), "checkpoints", "LATEST"]);
    let Some(text) = store.get_string(&latest_key)? else { return Ok(None) };
    let step: u64 = text
        .parse()
        .map_err(|_| crate::train::TrainError::Invalid(format!("{latest_key}: `{text}` is not a step number")))?;
    let d = step_dir(run_id, step);
    let tensors = store.get(&key(&[&d, "model.safetensors"]))?;
    let state_key = key(&[&d, "state.json"]);
    let state = serde_json::from_slice(&store.get(&state_key)?)
        .map_err(|e| crate::train::TrainError::Invalid(format!("{state_key}: {e}")))?;
    Ok(Some(Checkpoint { step, tensors, state }))
}

pub fn put_report(store: &Store, run_id: &str, name: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
    store.put(&key(&[&dir(run_id), "report", name]), bytes)
}
