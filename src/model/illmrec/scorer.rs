//! A trained I-LLMRec model as evaluation sees it: the user state from the LLM, item embeddings
//! from the item heads (computed once, for every item of the catalog it scores, new ones included).
//! It owns its session (a loaded checkpoint) or borrows one (validation during training).

use std::borrow::Borrow;

use candle_core::{DType, Tensor};

use super::session::Session;
use super::Graph;
use crate::data::Dataset;
use crate::model::{ModelError, Result, Scorer};

pub struct IllmRecScorer<'d, S: Borrow<Session>> {
    sess: S,
    ds: &'d Dataset,
    item_embs: Vec<Tensor>,
    /// Users per LLM call.
    batch: usize,
}

impl<'d, S: Borrow<Session>> IllmRecScorer<'d, S> {
    /// Scores `ds`'s items with the session's weights as they are now.
    pub fn new(sess: S, ds: &'d Dataset, batch: usize) -> Result<Self> {
        let item_embs = {
            let s: &Session = sess.borrow();
            s.model.item_embeddings(&s.feats)?
        };
        Ok(Self { sess, ds, item_embs, batch: batch.max(1) })
    }

    pub fn session(&self) -> &Session {
        self.sess.borrow()
    }
}

impl<S: Borrow<Session>> Scorer for IllmRecScorer<'_, S> {
    fn score(&self, histories: &[&[u32]]) -> Result<Vec<f32>> {
        let sess: &Session = self.sess.borrow();
        let mut out = Vec::with_capacity(histories.len() * (self.ds.num_items() + 1));
        for chunk in histories.chunks(self.batch) {
            let b = sess.retrieval_batch(self.ds, chunk).map_err(|e| ModelError::Invalid(e.to_string()))?;
            let h = sess.model.user_states(&sess.llm, &b, &sess.feats, Graph::Drop)?;
            let s = sess.model.scores(&h, &self.item_embs, &sess.feats)?;
            out.extend(s.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }
}
