//! `illmrec bench step --export DIR`: the inputs of the timed steps written out for the PyTorch
//! implementation of the same step (scripts/reference/torch_illmrec_step.py). The reference first
//! recomputes illmrec's logged losses from them (so both sides provably run the same step), then
//! times its own steps on the same prompts.
//!
//! `DIR/tensors.safetensors`: the trainable set as initialised (checkpoint names) and each feature
//! type's item matrix `feature.<kind>` with its mask `present.<kind>`. `DIR/config.json`: the model's
//! and the optimizer's settings. `DIR/step-<i>.json`: step i's packed RERI and RISA batches, targets,
//! negatives, learning rates and the losses and gradient norm illmrec logged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde_json::json;

use crate::data::windows::TrainingSample;
use crate::model::illmrec::batch::EncodedBatch;
use crate::model::illmrec::session::Session;
use crate::train::illmrec::step::StepLog;
use crate::train::{IllmRecTrainConfig, TrainError};

pub struct Export {
    dir: PathBuf,
}

fn io(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Invalid(format!("{}: {e}", path.display()))
}

impl Export {
    /// Writes the session's starting point into `dir` (created if missing).
    pub fn start(dir: &Path, sess: &Session, train: &IllmRecTrainConfig, llm_matmul: &str) -> Result<Self, TrainError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (name, var) in sess.model.vars() {
            tensors.insert(name.clone(), var.as_tensor().clone());
        }
        for (kind, f) in &sess.feats {
            tensors.insert(format!("feature.{kind}"), f.values.clone());
            tensors.insert(format!("present.{kind}"), f.present_t.clone());
        }
        let path = dir.join("tensors.safetensors");
        candle_core::safetensors::save(&tensors, &path).map_err(|e| io(&path, e))?;
        let config = json!({
            "llm": sess.llm.name,
            "llm_matmul": llm_matmul,
            "variant": sess.model.variant.name(),
            "model": sess.model.cfg,
            "train": train,
            "vars": sess.model.vars().iter().map(|(n, _)| n).collect::<Vec<_>>(),
        });
        let export = Self { dir: dir.to_path_buf() };
        export.write("config.json", &config)?;
        Ok(export)
    }

    /// Writes what step `index` (0-based, as timed) computed on and what it logged.
    pub fn step(
        &self,
        index: usize,
        batches: &(EncodedBatch, Option<EncodedBatch>),
        samples: &[TrainingSample],
        rates: (f64, f64),
        log: &StepLog,
    ) -> Result<(), TrainError> {
        let step = json!({
            "retrieval": batches.0,
            "alignment": batches.1,
            "targets": samples.iter().map(|s| s.target).collect::<Vec<_>>(),
            "negatives": samples.iter().map(|s| &s.negatives).collect::<Vec<_>>(),
            "lr": rates.0,
            "head_lr": rates.1,
            "logged": log,
        });
        self.write(&format!("step-{index}.json"), &step)
    }

    fn write(&self, file: &str, value: &serde_json::Value) -> Result<(), TrainError> {
        let path = self.dir.join(file);
        std::fs::write(&path, value.to_string()).map_err(|e| io(&path, e))
    }
}
