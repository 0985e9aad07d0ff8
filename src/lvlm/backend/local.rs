//! A Llama-family text model in process (the project's loaders: Hugging Face directory, GGUF, tiny),
//! greedy, with the answer held to its JSON shape over the candidate numbers (`grammar`), so every
//! answer parses.
//!
//! Cost: the token prefix every prompt of a run shares (the instructions) is read once and its cache
//! forked per request; requests are read one by one and their answers decoded `batch` at a time in
//! lockstep, each step reading the weights once for the whole batch and computing logits only over
//! the few tokens a list can contain; a row leaves the batch when its list is complete.

use std::cell::RefCell;
use std::time::Instant;

use candle_core::{Device, Tensor};

use super::{Backend, BackendError, Reply, Request};
use crate::lvlm::config::LocalConfig;
use crate::lvlm::grammar::{self, ListGrammar, EXPLANATION_OPENING, OPENING};
use crate::model::llm::{KvCache, Llm, LlmSource, VocabSubset};
use crate::model::LlmMatmul;

/// How a prompt is wrapped for the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChatFormat {
    /// `<|im_start|>user ... <|im_end|>` (SmolLM2, Qwen, ...).
    ChatMl,
    /// `User: ...\nAssistant: ` for models without a known chat template.
    Plain,
}

/// Prompt tokens are read this many at a time: causal attention over a chunk and what came before
/// skips most of the masked half of the scores a whole-prompt pass would compute.
const READ_CHUNK: usize = 256;

/// Where the time went.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LocalStats {
    pub requests: usize,
    /// Tokens of the prefix all prompts share, read once.
    pub shared_prefix_tokens: usize,
    /// Prompt tokens read per request (after the shared prefix).
    pub prompt_tokens_read: usize,
    pub read_seconds: f64,
    /// Lockstep decoding steps and their time (all rows of a batch per step).
    pub decode_steps: usize,
    pub decode_seconds: f64,
}

pub struct LocalText {
    llm: Llm,
    stats: RefCell<LocalStats>,
    identity: String,
    chat: ChatFormat,
    /// Tokens that can occur inside a list, with their text.
    list_tokens: Vec<(u32, String)>,
    list_logits: VocabSubset,
    opts: LocalConfig,
}

fn fatal(e: impl std::fmt::Display) -> BackendError {
    BackendError::Fatal(e.to_string())
}

impl LocalText {
    pub fn load(source: &LlmSource, opts: &LocalConfig) -> Result<Self, BackendError> {
        let llm = Llm::load_for(source, opts.matmul, &Device::Cpu).map_err(fatal)?;
        let chat = match (llm.tokenizer.token_to_id("<|im_start|>"), llm.tokenizer.token_to_id("<|im_end|>")) {
            (Some(_), Some(_)) => ChatFormat::ChatMl,
            _ => ChatFormat::Plain,
        };
        let vocab = llm.model.cfg.vocab_size as u32;
        let texts = (0..vocab).filter_map(|id| llm.decode(&[id]).ok().map(|t| (id, t)));
        let list_tokens = grammar::list_tokens(texts);
        if list_tokens.is_empty() {
            return Err(fatal(format!("{}: no token of the vocabulary can write a number", llm.name)));
        }
        let ids: Vec<u32> = list_tokens.iter().map(|(id, _)| *id).collect();
        let list_logits = llm.model.vocab_subset(&ids).map_err(fatal)?;
        let weights = match source {
            LlmSource::Gguf { file } => std::fs::metadata(file).map(|m| m.len()).unwrap_or(0),
            _ => 0,
        };
        // bf16 products can change an answer, so they are part of the cache key (f32 keeps the key
        // it always had).
        let precision = match llm.matmul() {
            LlmMatmul::F32 => "",
            LlmMatmul::Bf16 => " matmul=bf16",
        };
        let identity = format!(
            "local {} ({weights} bytes, {}) greedy list-constrained explanation_tokens={}{precision}",
            llm.name,
            crate::features::hash_json(source),
            opts.explanation_tokens
        );
        Ok(Self { llm, stats: RefCell::default(), identity, chat, list_tokens, list_logits, opts: opts.clone() })
    }

    /// The token ids the model reads for `prompt`: the chat wrapping and the answer's opening.
    fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>, BackendError> {
        let text = match self.chat {
            ChatFormat::ChatMl => format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{OPENING}"),
            ChatFormat::Plain => format!("User: {prompt}\nAssistant: {OPENING}"),
        };
        let mut ids = self.llm.encode(&text).map_err(fatal)?;
        if self.chat == ChatFormat::Plain {
            if let Some(bos) = self.llm.bos {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    fn embed(&self, ids: Vec<u32>, rows: usize) -> Result<Tensor, BackendError> {
        self.llm.embed_ids(ids, rows).map_err(fatal)
    }

    /// Reads `ids` after `cache` (in chunks), returning the final hidden state of the last one
    /// `[1, 1, hidden]`.
    fn read(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor, BackendError> {
        let mut last = None;
        for chunk in ids.chunks(READ_CHUNK) {
            let h = self.llm.model.forward_cached(&self.embed(chunk.to_vec(), 1)?, cache).map_err(fatal)?;
            last = Some(h.narrow(1, chunk.len() - 1, 1).map_err(fatal)?);
        }
        last.ok_or_else(|| fatal("reading no tokens"))
    }

    /// Decodes the lists of a batch of rows in lockstep; returns each row's list text (after the
    /// opening, `]` included), its generated tokens and its cache at the end.
    fn decode_lists(
        &self,
        grammar: &ListGrammar,
        mut cache: KvCache,
        mut hidden: Tensor,
        max_tokens: usize,
    ) -> Result<Vec<(String, usize, KvCache)>, BackendError> {
        let rows = cache.rows();
        let mut texts = vec![String::new(); rows];
        let mut tokens = vec![0usize; rows];
        let mut finished: Vec<Option<KvCache>> = (0..rows).map(|_| None).collect();
        // Rows still decoding, by their position in `cache` and `hidden`.
        let mut active: Vec<usize> = (0..rows).collect();
        while !active.is_empty() {
            let logits = self.list_logits.logits(&hidden).map_err(fatal)?;
            let logits: Vec<Vec<f32>> = logits.squeeze(1).and_then(|l| l.to_vec2::<f32>()).map_err(fatal)?;
            let mut next = Vec::with_capacity(active.len());
            let mut keep = Vec::with_capacity(active.len());
            for (slot, &row) in active.iter().enumerate() {
                let choices = grammar::allowed(grammar, &texts[row], &self.list_tokens);
                let best = choices
                    .iter()
                    .max_by(|a, b| logits[slot][a.0].total_cmp(&logits[slot][b.0]))
                    .copied()
                    .filter(|_| tokens[row] < max_tokens);
                match best {
                    Some((k, closes)) => {
                        texts[row].push_str(&self.list_tokens[k].1);
                        tokens[row] += 1;
                        next.push(self.list_tokens[k].0);
                        if closes {
                            // Its last token still goes through the model, so the cache holds the
                            // whole list (an explanation continues from it).
                            keep.push((slot, true));
                        } else {
                            keep.push((slot, false));
                        }
                    }
                    // Out of tokens (or, which the grammar rules out, of choices): the list stays open.
                    None => finished[row] = Some(cache.select_rows(&[slot]).map_err(fatal)?),
                }
            }
            let stepping: Vec<usize> = keep.iter().map(|(slot, _)| *slot).collect();
            if stepping.is_empty() {
                break;
            }
            if stepping.len() < active.len() {
                cache = cache.select_rows(&stepping).map_err(fatal)?;
            }
            let x = self.embed(next, stepping.len())?;
            hidden = self.llm.model.forward_cached(&x, &mut cache).map_err(fatal)?;
            self.stats.borrow_mut().decode_steps += 1;
            let mut still = Vec::new();
            let mut still_slots = Vec::new();
            for (new_slot, (old_slot, closed)) in keep.iter().enumerate() {
                let row = active[*old_slot];
                if *closed {
                    finished[row] = Some(cache.select_rows(&[new_slot]).map_err(fatal)?);
                } else {
                    still.push(row);
                    still_slots.push(new_slot);
                }
            }
            if still.len() < stepping.len() && !still.is_empty() {
                cache = cache.select_rows(&still_slots).map_err(fatal)?;
                let idx = Tensor::from_vec(
                    still_slots.iter().map(|&s| s as u32).collect::<Vec<_>>(),
                    still_slots.len(),
                    hidden.device(),
                )
                .map_err(fatal)?;
                hidden = hidden.index_select(&idx, 0).map_err(fatal)?;
            }
            active = still;
        }
        finished
            .into_iter()
            .zip(texts.into_iter().zip(tokens))
            .map(|(c, (t, n))| c.map(|c| (t, n, c)).ok_or_else(|| fatal("a row left decoding without its cache")))
            .collect()
    }

    /// Free text after the list, up to a quote or `limit` tokens; returns the text and its tokens.
    fn explanation(&self, cache: &mut KvCache, limit: usize) -> Result<(String, usize), BackendError> {
        let opening = self.llm.encode(EXPLANATION_OPENING).map_err(fatal)?;
        let mut hidden = self.read(&opening, cache)?;
        let mut ids = Vec::new();
        let mut text = String::new();
        while ids.len() < limit {
            let logits = self.llm.model.logits(&hidden).map_err(fatal)?;
            let next = crate::model::llm::argmax_rows(&logits.squeeze(1).map_err(fatal)?).map_err(fatal)?[0];
            if next == self.llm.eos {
                break;
            }
            ids.push(next);
            text = self.llm.decode(&ids).map_err(fatal)?;
            if text.contains('"') {
                break;
            }
            hidden = self.read(&[next], cache)?;
        }
        let cut = text.split('"').next().unwrap_or_default().trim().to_string();
        Ok((cut, opening.len() + ids.len()))
    }
}

/// The length of the token prefix all of `prompts` share, keeping at least one token of each.
fn shared_prefix(prompts: &[Vec<u32>]) -> usize {
    let Some(first) = prompts.first() else { return 0 };
    let mut n = first.len();
    for p in &prompts[1..] {
        n = n.min(first.iter().zip(p).take_while(|(a, b)| a == b).count());
    }
    n.min(prompts.iter().map(Vec::len).min().unwrap_or(0).saturating_sub(1))
}

impl Backend for LocalText {
    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn sees_images(&self) -> bool {
        false
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::to_value(&*self.stats.borrow()).unwrap_or_default()
    }

    fn answer(
        &self,
        requests: &[Request],
        done: &mut dyn FnMut(usize, Result<Reply, BackendError>),
    ) -> Result<(), BackendError> {
        let mut todo = Vec::new();
        let mut prompts = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            if r.images.is_empty() {
                todo.push(i);
                prompts.push(self.prompt_ids(&r.prompt)?);
            } else {
                done(
                    i,
                    Err(BackendError::Request(format!("{} reads text only; the prompt has images", self.llm.name))),
                );
            }
        }
        let shared = if prompts.len() > 1 { shared_prefix(&prompts) } else { 0 };
        let mut prefix = self.llm.model.new_cache(shared).map_err(fatal)?;
        if shared > 0 {
            self.read(&prompts[0][..shared], &mut prefix)?;
        }
        // Lockstep decoding holds a batch to one list shape: batches are cut within each shape.
        let mut order: Vec<usize> = (0..todo.len()).collect();
        order.sort_by_key(|&j| (requests[todo[j]].labels, requests[todo[j]].list_length));
        let batches = order.chunk_by(|&a, &b| {
            let (ra, rb) = (&requests[todo[a]], &requests[todo[b]]);
            (ra.labels, ra.list_length) == (rb.labels, rb.list_length)
        });
        for chunk in batches.flat_map(|group| group.chunks(self.opts.batch)) {
            let started = Instant::now();
            let first = &requests[todo[chunk[0]]];
            let grammar = ListGrammar::new(first.labels, first.list_length);
            let room = 4 * grammar.length + self.opts.explanation_tokens + 16;
            let mut caches = Vec::with_capacity(chunk.len());
            let mut hidden = Vec::with_capacity(chunk.len());
            for &j in chunk {
                let mut c = prefix.fork(prompts[j].len() - shared).map_err(fatal)?;
                hidden.push(self.read(&prompts[j][shared..], &mut c)?);
                caches.push(c);
            }
            let cache = KvCache::stack(&caches, room).map_err(fatal)?;
            drop(caches);
            let hidden = Tensor::cat(&hidden, 0).map_err(fatal)?;
            let max_tokens = chunk.iter().map(|&j| requests[todo[j]].max_tokens).min().unwrap_or(0);
            let read = started.elapsed().as_secs_f64();
            let lists = self.decode_lists(&grammar, cache, hidden, max_tokens)?;
            {
                let mut st = self.stats.borrow_mut();
                st.requests += chunk.len();
                st.shared_prefix_tokens = shared;
                st.prompt_tokens_read += chunk.iter().map(|&j| prompts[j].len() - shared).sum::<usize>();
                st.read_seconds += read;
                st.decode_seconds += started.elapsed().as_secs_f64() - read;
            }
            let mut replies = Vec::with_capacity(chunk.len());
            for (j, (list, mut generated, mut cache)) in chunk.iter().zip(lists) {
                let mut text = format!("{OPENING}{list}");
                if list.ends_with(']') {
                    if self.opts.explanation_tokens > 0 {
                        let (why, n) = self.explanation(&mut cache, self.opts.explanation_tokens)?;
                        let quoted = serde_json::to_string(&why).unwrap_or_default();
                        text.push_str(&format!("{}{quoted}", &EXPLANATION_OPENING[..EXPLANATION_OPENING.len() - 1]));
                        generated += n;
                    }
                    text.push('}');
                }
                replies.push((todo[*j], prompts[*j].len(), generated, text));
            }
            let share = started.elapsed().as_secs_f64() / chunk.len() as f64;
            for (i, prompt_tokens, completion_tokens, text) in replies {
                done(i, Ok(Reply { text, prompt_tokens, completion_tokens, seconds: share }));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lvlm::answer;
    use crate::model::llm::TinyLlmConfig;

    #[test]
    fn shared_prefixes_keep_a_token_of_every_prompt() {
        assert_eq!(shared_prefix(&[vec![1, 2, 3, 4], vec![1, 2, 3, 5], vec![1, 2, 9]]), 2);
        assert_eq!(shared_prefix(&[vec![1, 2], vec![1, 2, 3]]), 1);
        assert_eq!(shared_prefix(&[vec![7], vec![8]]), 0);
    }

    #[test]
    fn a_random_model_still_answers_complete_lists_that_parse_in_batches_or_alone() {
        let source = LlmSource::Tiny(TinyLlmConfig::default());
        let titles: Vec<String> = (1..=12).map(|i| format!("item number {i}")).collect();
        let prompt = |u: usize| format!("User {u} bought a lamp. Candidates: {}", titles.join("; "));
        let requests: Vec<Request> = (0..5)
            .map(|u| Request { prompt: prompt(u), images: vec![], labels: 12, list_length: 4, max_tokens: 64 })
            .collect();
        let run_at = |batch: usize, explanation_tokens: usize, matmul: LlmMatmul| {
            let b = LocalText::load(&source, &LocalConfig { batch, explanation_tokens, matmul }).unwrap();
            let mut out = vec![None; requests.len()];
            b.answer(&requests, &mut |i, r| out[i] = Some(r.unwrap())).unwrap();
            out.into_iter().map(Option::unwrap).collect::<Vec<Reply>>()
        };
        let run = |batch, explanation_tokens| run_at(batch, explanation_tokens, LlmMatmul::F32);
        let batched = run(3, 0);
        let alone = run(1, 0);
        for (a, b) in batched.iter().zip(&alone) {
            assert_eq!(a.text, b.text);
            let p = answer::parse(&a.text, &titles).unwrap();
            assert_eq!((p.ranking.len(), p.hallucinated, p.duplicates, p.truncated), (4, 0, 0, false), "{}", a.text);
            assert!(a.prompt_tokens > 20 && a.completion_tokens >= 8, "{a:?}");
        }
        // With an explanation the list is the same and the JSON still parses.
        for (a, b) in run(2, 5).iter().zip(&alone) {
            let p = answer::parse(&a.text, &titles).unwrap();
            assert_eq!(p.ranking, answer::parse(&b.text, &titles).unwrap().ranking, "{}", a.text);
            assert!(a.text.contains("\"explanation\": \""), "{}", a.text);
        }
        // bf16 products: a row's answer does not depend on the batch around it either, and it parses.
        for (a, b) in run_at(3, 0, LlmMatmul::Bf16).iter().zip(&run_at(1, 0, LlmMatmul::Bf16)) {
            assert_eq!(a.text, b.text);
            assert_eq!(answer::parse(&a.text, &titles).unwrap().ranking.len(), 4, "{}", a.text);
        }
    }

    #[test]
    fn bf16_products_are_part_of_the_answer_cache_key_where_they_run() {
        let source = LlmSource::Tiny(TinyLlmConfig::default());
        let load = |matmul| LocalText::load(&source, &LocalConfig { matmul, ..LocalConfig::default() }).unwrap();
        let (f32, bf16) = (load(LlmMatmul::F32), load(LlmMatmul::Bf16));
        assert!(!f32.identity().contains("matmul"), "{}", f32.identity());
        assert_eq!(bf16.identity() != f32.identity(), bf16.llm.matmul() == LlmMatmul::Bf16);
    }
}
