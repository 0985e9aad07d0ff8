//! Opens an I-LLMRec session for training or scoring: the job's LLM, its item features from the
//! store, and a freshly initialised trainable set (a checkpoint may overwrite it).

use super::super::{Result, TrainError, TrainJob};
use crate::data::prompt::{PromptBuilder, Variant};
use crate::data::Dataset;
use crate::model::illmrec::session::Session;
use crate::model::illmrec::{FeatureMatrix, Features, IllmRec};
use crate::model::llm::Llm;
use crate::seed::stream;
use crate::store::Store;

/// Loads the job's LLM and features and builds a freshly initialised model for `variant`.
pub fn open(job: &TrainJob<'_>, store: &Store, ds: &Dataset, variant: Variant) -> Result<Session> {
    let device = job.model.device.open(crate::distributed::Launcher::detect().local_rank)?;
    let llm = Llm::load_for(&job.model.llm, job.model.llm_matmul, &device)?;
    let cfg = &job.model.illmrec;
    let mut feats = Features::new();
    let mut fallback_items = 0;
    for kind in cfg.feature_kinds(variant) {
        let f = crate::features::load(job.features, kind, ds, store, &job.cf_table)?;
        if kind == cfg.token_feature && variant.has_item_token() {
            fallback_items = f.missing();
            if fallback_items > 0 && cfg.fallback_feature.is_none() {
                return Err(TrainError::Invalid(format!(
                    "{fallback_items} items have no {kind} feature: set model.illmrec.fallback_feature"
                )));
            }
        }
        feats.insert(kind, FeatureMatrix::new(kind, f.dim, &f.values, &f.present, llm.model.dtype(), &device)?);
    }
    let mut rng = stream(job.train.seed, "illmrec/init", 0);
    let model = IllmRec::new(cfg, variant, &llm, &FeatureMatrix::dims(&feats), &mut rng)?;
    let builder = PromptBuilder { variant, max_description_words: cfg.max_description_words };
    Ok(Session { llm, feats, model, builder, fallback_items })
}
