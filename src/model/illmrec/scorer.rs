//! A trained I-LLMRec model as evaluation sees it: the user state from the LLM, item embeddings
//! from the item heads (computed once, for every item of the catalog it scores, new ones included).

use candle_core::{DType, Tensor};

use super::session::Session;
use crate::data::Dataset;
use crate::model::{ModelError, Result, Scorer};

pub struct IllmRecScorer {
    sess: Session,
    ds: Dataset,
    item_embs: Vec<Tensor>,
    /// Users per LLM call.
    batch: usize,
}

impl IllmRecScorer {
    /// Scores `ds`'s items with the session's (trained) weights.
    pub fn new(sess: Session, ds: &Dataset, batch: usize) -> Result<Self> {
        let item_embs = sess.model.item_embeddings(&sess.feats)?;
        Ok(Self { sess, ds: ds.clone(), item_embs, batch: batch.max(1) })
    }

    pub fn session(&self) -> &Session {
        &self.sess
    }
}

impl Scorer for IllmRecScorer {
    fn score(&self, histories: &[&[u32]]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(histories.len() * (self.ds.num_items() + 1));
        for chunk in histories.chunks(self.batch) {
            let b = self.sess.retrieval_batch(&self.ds, chunk).map_err(|e| ModelError::Invalid(e.to_string()))?;
            let h = self.sess.model.user_states(&self.sess.llm, &b, &self.sess.feats)?;
            let s = self.sess.model.scores(&h, &self.item_embs, &self.sess.feats)?;
            out.extend(s.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }
}
