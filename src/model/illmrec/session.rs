//! A trainable I-LLMRec model with everything it needs at hand: the frozen LLM, the item features,
//! the trainable set, and the prompt builder of its variant. Training (`train::illmrec`) and scoring
//! (`scorer.rs`) both work through it; building one from a job's files is training's business.

use candle_core::Var;

use super::batch::{encode, EncodedBatch};
use super::{Features, IllmRec};
use crate::data::prompt::{Prompt, PromptBuilder, Segment};
use crate::data::Dataset;
use crate::model::llm::{Llm, LlmError};

pub struct Session {
    pub llm: Llm,
    pub feats: Features,
    pub model: IllmRec,
    pub builder: PromptBuilder,
    /// Items whose prompt token comes through the missing-feature fallback.
    pub fallback_items: usize,
}

impl Session {
    /// Tokenizes prompts into one packed batch (its shared prefix left to the LLM's cache where the
    /// model allows).
    pub fn encode_all(&self, prompts: Vec<Prompt>) -> Result<EncodedBatch, LlmError> {
        let encoded = prompts.iter().map(|p| encode(&self.llm, p)).collect::<Result<Vec<_>, _>>()?;
        Ok(EncodedBatch::new(&encoded, self.model.caches_prefix()))
    }

    /// The retrieval prompts of histories (their last `max_history` items), as a batch.
    pub fn retrieval_batch(&self, ds: &Dataset, histories: &[&[u32]]) -> Result<EncodedBatch, LlmError> {
        let max = self.model.cfg.max_history;
        self.encode_all(
            histories
                .iter()
                .map(|h| {
                    let items: Vec<_> = h[h.len().saturating_sub(max)..].iter().map(|&i| ds.item(i)).collect();
                    self.builder.retrieval(&items)
                })
                .collect(),
        )
    }

    /// The trainable variables, in the model's fixed order (the all-reduce order).
    pub fn vars(&self) -> Vec<&Var> {
        self.model.vars().iter().map(|(_, v)| v).collect()
    }

    /// Mean tokens of an item's piece of the prompt (text tokens + its item token), over the catalog,
    /// under `builder` (this session's or another variant's).
    pub fn tokens_per_item(&self, builder: &PromptBuilder, ds: &Dataset) -> Result<f64, LlmError> {
        let mut total = 0usize;
        for item in &ds.items {
            let mut segments = Vec::new();
            builder.item_piece(item, &mut segments);
            total += self.segment_tokens(&segments)?;
        }
        Ok(total as f64 / ds.num_items().max(1) as f64)
    }

    /// Mean tokens of the test-split retrieval prompt (the last `max_history` items) over the first
    /// `users` users, under `builder`.
    pub fn mean_prompt_tokens(&self, builder: &PromptBuilder, ds: &Dataset, users: usize) -> Result<f64, LlmError> {
        let n = ds.num_users().min(users).max(1);
        let mut total = 0;
        for u in 0..n {
            let h = crate::data::windows::eval_history(ds, u, crate::data::Split::Test, self.model.cfg.max_history);
            let items: Vec<_> = h.iter().map(|&i| ds.item(i)).collect();
            total += self.segment_tokens(&builder.retrieval(&items).segments)?;
        }
        Ok(total as f64 / n as f64)
    }

    fn segment_tokens(&self, segments: &[Segment]) -> Result<usize, LlmError> {
        let mut n = 0;
        for s in segments {
            n += match s {
                Segment::Text(t) => self.llm.encode(t)?.len(),
                Segment::Bos => usize::from(self.llm.bos.is_some()),
                Segment::ItemToken(_) | Segment::Rec => 1,
            };
        }
        Ok(n)
    }
}
