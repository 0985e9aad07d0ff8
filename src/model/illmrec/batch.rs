//! Prompts to token ids: text segments go through the LLM's tokenizer one by one; item-token and
//! [REC] slots become positions whose embeddings the model writes. A batch packs its rows without
//! padding, and keeps a prefix they all share once.

use crate::data::prompt::{Prompt, Segment};
use crate::model::llm::{Llm, LlmError};

/// One prompt as token ids with its slots and supervised answer tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedPrompt {
    pub ids: Vec<u32>,
    /// Leading tokens that are the template's constant prefix (the prompt's `prefix` segments).
    pub prefix: usize,
    /// (position, item index) of each item-token slot.
    pub item_slots: Vec<(usize, u32)>,
    pub rec: Option<usize>,
    /// (position whose output predicts the token, token id): the answer and EOS.
    pub labels: Vec<(usize, u32)>,
}

pub fn encode(llm: &Llm, prompt: &Prompt) -> Result<EncodedPrompt, LlmError> {
    let mut out = EncodedPrompt { ids: Vec::new(), prefix: 0, item_slots: Vec::new(), rec: None, labels: Vec::new() };
    for (k, seg) in prompt.segments.iter().enumerate() {
        if k == prompt.prefix {
            out.prefix = out.ids.len();
        }
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
    if prompt.prefix >= prompt.segments.len() {
        out.prefix = out.ids.len();
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

/// Several encoded prompts packed one after another, without padding, as the LLM takes them
/// (`Llama::forward_packed`). When every prompt opens with the same constant prefix and the caller
/// allows it, the prefix is taken off the rows and kept once in `prefix`: the LLM's cached keys and
/// values stand in for it. Positions are flat indices into `ids`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EncodedBatch {
    /// The shared prefix's tokens (empty when the rows carry their whole prompts).
    pub prefix: Vec<u32>,
    pub ids: Vec<u32>,
    /// Tokens per row after the prefix.
    pub lens: Vec<usize>,
    pub slot_pos: Vec<u32>,
    pub slot_items: Vec<u32>,
    /// One per row that has a [REC] slot, in row order.
    pub rec_pos: Vec<u32>,
    pub label_pos: Vec<u32>,
    pub label_ids: Vec<u32>,
    /// For each label, 1 / (rows * labels in its row): the weights that make the loss a mean over
    /// rows of per-row means.
    pub label_weights: Vec<f32>,
}

impl EncodedBatch {
    /// Packs `prompts`; with `split_prefix`, a prefix every prompt shares is kept once.
    pub fn new(prompts: &[EncodedPrompt], split_prefix: bool) -> Self {
        let rows = prompts.len();
        fn shared(p: &EncodedPrompt) -> &[u32] {
            &p.ids[..p.prefix]
        }
        let cut = match prompts.first() {
            Some(first) if split_prefix && first.prefix > 0 && prompts.iter().all(|p| shared(p) == shared(first)) => {
                first.prefix
            }
            _ => 0,
        };
        let mut b = EncodedBatch {
            prefix: prompts.first().map(|p| p.ids[..cut].to_vec()).unwrap_or_default(),
            ids: Vec::new(),
            lens: Vec::with_capacity(rows),
            slot_pos: Vec::new(),
            slot_items: Vec::new(),
            rec_pos: Vec::new(),
            label_pos: Vec::new(),
            label_ids: Vec::new(),
            label_weights: Vec::new(),
        };
        for p in prompts {
            // A position of the prompt, in the packed rows.
            let base = b.ids.len();
            let at = |pos: usize| (base + pos - cut) as u32;
            b.ids.extend(&p.ids[cut..]);
            b.lens.push(p.ids.len() - cut);
            for &(pos, item) in &p.item_slots {
                b.slot_pos.push(at(pos));
                b.slot_items.push(item);
            }
            if let Some(pos) = p.rec {
                b.rec_pos.push(at(pos));
            }
            let w = 1.0 / (rows * p.labels.len().max(1)) as f32;
            for &(pos, id) in &p.labels {
                b.label_pos.push(at(pos));
                b.label_ids.push(id);
                b.label_weights.push(w);
            }
        }
        b
    }

    pub fn rows(&self) -> usize {
        self.lens.len()
    }

    /// Tokens the LLM computes for the rows (the cached prefix not counted).
    pub fn tokens(&self) -> usize {
        self.ids.len()
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
            prefix: 0,
        };
        let e = encode(&llm, &p).unwrap();
        let n_text = llm.encode("a b").unwrap().len();
        assert_eq!(e.item_slots, vec![(1 + n_text, 4)]);
        assert_eq!(e.rec, Some(2 + n_text));
        let c = llm.encode("c").unwrap();
        assert_eq!(e.labels.len(), c.len() + 1);
        assert_eq!(e.labels[0], (2 + n_text, c[0]));
        assert_eq!(*e.labels.last().unwrap(), (e.ids.len() - 2, llm.eos));

        let short = encode(&llm, &Prompt { segments: vec![Segment::Rec], answer: None, prefix: 0 }).unwrap();
        let b = EncodedBatch::new(&[e.clone(), short], true);
        assert_eq!(b.lens, vec![e.ids.len(), 1], "no shared prefix: whole rows, no padding");
        assert_eq!(b.rec_pos, vec![(2 + n_text) as u32, e.ids.len() as u32]);
        assert!(b.label_weights.iter().all(|&w| (w - 1.0 / (2.0 * e.labels.len() as f32)).abs() < 1e-9));
    }

    #[test]
    fn a_shared_prefix_is_kept_once_and_positions_follow_it() {
        let llm =
            Llm::load(&LlmSource::Tiny(TinyLlmConfig::default()), candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap();
        let prompt = |title: &str| Prompt {
            segments: vec![
                Segment::Bos,
                Segment::Text("your job".into()),
                Segment::Text(title.into()),
                Segment::ItemToken(3),
                Segment::Rec,
            ],
            answer: None,
            prefix: 2,
        };
        let (a, b) = (encode(&llm, &prompt("lamp")).unwrap(), encode(&llm, &prompt("red pen")).unwrap());
        let p = 1 + llm.encode("your job").unwrap().len();
        assert_eq!((a.prefix, b.prefix), (p, p));
        let batch = EncodedBatch::new(&[a.clone(), b.clone()], true);
        assert_eq!(batch.prefix, a.ids[..p].to_vec());
        assert_eq!(batch.lens, vec![a.ids.len() - p, b.ids.len() - p]);
        assert_eq!(batch.ids[..batch.lens[0]], a.ids[p..]);
        let first_rec = a.rec.unwrap() - p;
        assert_eq!(batch.rec_pos, vec![first_rec as u32, (batch.lens[0] + b.rec.unwrap() - p) as u32]);
        // Not split: whole rows.
        let whole = EncodedBatch::new(&[a.clone(), b], false);
        assert!(whole.prefix.is_empty());
        assert_eq!(whole.lens[0], a.ids.len());
    }
}
