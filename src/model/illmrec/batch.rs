//! Prompts to token ids: text segments go through the LLM's tokenizer one by one; item-token and
//! [REC] slots become positions whose embeddings the model writes. Rows are right-padded, which the
//! causal decoder needs no mask for (`Llama::forward_embeds`).

use crate::data::prompt::{Prompt, Segment};
use crate::model::llm::{Llm, LlmError};

/// One prompt as token ids with its slots and supervised answer tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedPrompt {
    pub ids: Vec<u32>,
    /// (position, item index) of each item-token slot.
    pub item_slots: Vec<(usize, u32)>,
    pub rec: Option<usize>,
    /// (position whose output predicts the token, token id): the answer and EOS.
    pub labels: Vec<(usize, u32)>,
}

pub fn encode(llm: &Llm, prompt: &Prompt) -> Result<EncodedPrompt, LlmError> {
    let mut out = EncodedPrompt { ids: Vec::new(), item_slots: Vec::new(), rec: None, labels: Vec::new() };
    for seg in &prompt.segments {
        match seg {
            Segment::Text(t) => out.ids.extend(llm.encode(t)?),
            Segment::Bos => out.ids.extend(llm.bos),
            // The placeholder id is never embedded: the model overwrites the slot.
            Segment::ItemToken(item) => {
                out.item_slots.push((out.ids.len(), *item));
                out.ids.push(llm.eos);
            }
            Segment::Rec => {
                out.rec = Some(out.ids.len());
                out.ids.push(llm.eos);
            }
        }
    }
    if let Some(answer) = &prompt.answer {
        let mut tokens = llm.encode(answer)?;
        tokens.push(llm.eos);
        for t in tokens {
            out.labels.push((out.ids.len() - 1, t));
            out.ids.push(t);
        }
    }
    Ok(out)
}

/// Several encoded prompts as one right-padded batch, with flat (row * len + position) indices.
#[derive(Debug, Clone)]
pub struct EncodedBatch {
    pub rows: usize,
    pub len: usize,
    pub ids: Vec<u32>,
    pub slot_pos: Vec<u32>,
    pub slot_items: Vec<u32>,
    /// One per row that has a [REC] slot, in row order.
    pub rec_pos: Vec<u32>,
    pub label_pos: Vec<u32>,
    pub label_ids: Vec<u32>,
    /// For each label, 1 / (rows * labels in its row): the weights that make the loss a mean over
    /// rows of per-row means.
    pub label_weights: Vec<f32>,
    /// Real (unpadded) tokens per row.
    pub lengths: Vec<usize>,
}

impl EncodedBatch {
    pub fn new(prompts: &[EncodedPrompt], pad: u32) -> Self {
        let rows = prompts.len();
        let len = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(1).max(1);
        let mut b = EncodedBatch {
            rows,
            len,
            ids: vec![pad; rows * len],
            slot_pos: Vec::new(),
            slot_items: Vec::new(),
            rec_pos: Vec::new(),
            label_pos: Vec::new(),
            label_ids: Vec::new(),
            label_weights: Vec::new(),
            lengths: prompts.iter().map(|p| p.ids.len()).collect(),
        };
        for (r, p) in prompts.iter().enumerate() {
            let base = r * len;
            b.ids[base..base + p.ids.len()].copy_from_slice(&p.ids);
            for &(pos, item) in &p.item_slots {
                b.slot_pos.push((base + pos) as u32);
                b.slot_items.push(item);
            }
            if let Some(pos) = p.rec {
                b.rec_pos.push((base + pos) as u32);
            }
            let w = 1.0 / (rows * p.labels.len().max(1)) as f32;
            for &(pos, id) in &p.labels {
                b.label_pos.push((base + pos) as u32);
                b.label_ids.push(id);
                b.label_weights.push(w);
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::prompt::Prompt;
    use crate::model::llm::{LlmSource, TinyLlmConfig};

    #[test]
    fn slots_rec_and_labels_land_on_the_right_positions() {
        let llm =
            Llm::load(&LlmSource::Tiny(TinyLlmConfig::default()), candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap();
        let p = Prompt {
            segments: vec![Segment::Bos, Segment::Text("a b".into()), Segment::ItemToken(4), Segment::Rec],
            answer: Some("c".into()),
        };
        let e = encode(&llm, &p).unwrap();
        let n_text = llm.encode("a b").unwrap().len();
        assert_eq!(e.item_slots, vec![(1 + n_text, 4)]);
        assert_eq!(e.rec, Some(2 + n_text));
        let c = llm.encode("c").unwrap();
        assert_eq!(e.labels.len(), c.len() + 1);
        assert_eq!(e.labels[0], (2 + n_text, c[0]));
        assert_eq!(*e.labels.last().unwrap(), (e.ids.len() - 2, llm.eos));

        let short = encode(&llm, &Prompt { segments: vec![Segment::Rec], answer: None }).unwrap();
        let b = EncodedBatch::new(&[e.clone(), short], 0);
        assert_eq!((b.rows, b.len), (2, e.ids.len()));
        assert_eq!(b.rec_pos, vec![(2 + n_text) as u32, b.len as u32]);
        assert!(b.label_weights.iter().all(|&w| (w - 1.0 / (2.0 * e.labels.len() as f32)).abs() < 1e-9));
    }
}
