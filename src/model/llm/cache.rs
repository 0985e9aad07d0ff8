//! Generation with a key/value cache, through the same decoder blocks as the training forward
//! (`Llama::blocks_with` in `llama.rs`) with attention over the cache instead of over packed rows.
//! The keys and values of the tokens seen so far are kept per layer, so a new token costs one row
//! through the decoder instead of the whole prefix again. A cache is cheap to clone (its tensors
//! are shared until appended to), so a prompt prefix common to many requests is computed once; and
//! caches can be stacked to decode several sequences in lockstep, reading the weights once per step
//! for all of them.
//!
//! Rows of a stacked cache may hold different numbers of tokens: shorter rows are right-padded, the
//! padded slots are masked, and each row keeps its own positions for RoPE. RoPE makes attention
//! scores depend on relative positions only, so a row attends exactly as it would alone.
//!
//! Several new tokens (a prompt, one row) attend through the fused `packed_attention`, the row's
//! cached keys and values as its prefix; one new token per row (a decoding step) attends through
//! the small masked product below, each row over its own cached slots.

use candle_core::{DType, Tensor, D};

use super::frozen::FrozenLinear;
use super::ops::{packed_attention, rms_norm};
use super::Llama;

/// Keys and values (after RoPE) of every layer for a batch of sequences, in buffers with room to
/// grow: appending writes in place, so a step does not copy what the cache holds.
pub struct KvCache {
    /// Per layer: key and value buffers `[rows, kv_heads, capacity, head_dim]`.
    layers: Vec<(Tensor, Tensor)>,
    /// Slots written so far (the same for every row).
    used: usize,
    /// `valid[row][slot]`: the slot holds one of the row's tokens (else it is padding).
    valid: Vec<Vec<bool>>,
}

impl KvCache {
    fn empty(
        rows: usize,
        layers: usize,
        (kv_heads, head_dim): (usize, usize),
        capacity: usize,
        like: &Tensor,
    ) -> candle_core::Result<Self> {
        let buf = || Tensor::zeros((rows, kv_heads, capacity, head_dim), like.dtype(), like.device());
        Ok(Self {
            layers: (0..layers).map(|_| Ok((buf()?, buf()?))).collect::<candle_core::Result<_>>()?,
            used: 0,
            valid: vec![Vec::new(); rows],
        })
    }

    pub fn rows(&self) -> usize {
        self.valid.len()
    }

    /// Tokens seen by `row`: the position its next token takes.
    pub fn len(&self, row: usize) -> usize {
        self.valid[row].iter().filter(|v| **v).count()
    }

    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    fn capacity(&self) -> usize {
        self.layers.first().and_then(|(k, _)| k.dim(2).ok()).unwrap_or(0)
    }

    fn shape(&self) -> candle_core::Result<(usize, usize)> {
        let (k, _) = self.layers.first().ok_or_else(|| candle_core::Error::Msg("a cache without layers".into()))?;
        Ok((k.dim(1)?, k.dim(3)?))
    }

    /// A copy with room for `extra` more tokens: the start of several continuations of a shared
    /// prefix.
    pub fn fork(&self, extra: usize) -> candle_core::Result<KvCache> {
        KvCache::stack(std::slice::from_ref(self), extra)
    }

    /// One batch of the rows of `caches`, in order, with room for `extra` more tokens; shorter rows
    /// are right-padded with masked slots.
    pub fn stack(caches: &[KvCache], extra: usize) -> candle_core::Result<KvCache> {
        let Some(first) = caches.first() else { candle_core::bail!("stacking no caches") };
        let used = caches.iter().map(|c| c.used).max().unwrap_or(0);
        let rows = caches.iter().map(KvCache::rows).sum();
        let (like, _) = &first.layers[0];
        let mut out = KvCache::empty(rows, first.layers.len(), first.shape()?, used + extra, like)?;
        let mut row = 0;
        for c in caches {
            for (dst, src) in out.layers.iter().zip(&c.layers) {
                if c.used > 0 {
                    for (d, s) in [(&dst.0, &src.0), (&dst.1, &src.1)] {
                        d.narrow(0, row, c.rows())?.slice_set(&s.narrow(2, 0, c.used)?.contiguous()?, 2, 0)?;
                    }
                }
            }
            for r in &c.valid {
                out.valid[row] = r.iter().copied().chain(std::iter::repeat(false)).take(used).collect();
                row += 1;
            }
        }
        out.used = used;
        Ok(out)
    }

    /// The cache of the rows `keep`, in that order (drops sequences that finished).
    pub fn select_rows(&self, keep: &[usize]) -> candle_core::Result<KvCache> {
        let (like, _) = &self.layers[0];
        let idx = Tensor::from_vec(keep.iter().map(|&r| r as u32).collect::<Vec<_>>(), keep.len(), like.device())?;
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| Ok((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?)))
            .collect::<candle_core::Result<_>>()?;
        Ok(KvCache { layers, used: self.used, valid: keep.iter().map(|&r| self.valid[r].clone()).collect() })
    }

    /// Makes room for `t` more slots (doubling the buffers when full).
    fn reserve(&mut self, t: usize) -> candle_core::Result<()> {
        if self.used + t <= self.capacity() {
            return Ok(());
        }
        let grown = KvCache::stack(std::slice::from_ref(self), (self.used + t).max(2 * self.capacity()) - self.used)?;
        *self = grown;
        Ok(())
    }

    /// The keys and values of row `row`'s own tokens at `layer`, `[kv_heads, len, head_dim]` each
    /// (its padded slots left out).
    fn row_slots(&self, layer: usize, row: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let (k, v) = &self.layers[layer];
        let (k, v) = (k.get(row)?, v.get(row)?);
        let valid = &self.valid[row];
        if valid.iter().all(|v| *v) {
            return Ok((k.narrow(1, 0, self.used)?, v.narrow(1, 0, self.used)?));
        }
        let slots: Vec<u32> = (0..self.used as u32).filter(|&s| valid[s as usize]).collect();
        let idx = Tensor::from_vec(slots, self.len(row), k.device())?;
        Ok((k.index_select(&idx, 1)?, v.index_select(&idx, 1)?))
    }

    /// Additive attention mask `[rows, 1, 1, used + 1]` for one new token per row when some row has
    /// padded slots, or `None` when every row may see every slot.
    fn mask(&self, dtype: DType, dev: &candle_core::Device) -> candle_core::Result<Option<Tensor>> {
        if self.valid.iter().all(|r| r.iter().all(|v| *v)) {
            return Ok(None);
        }
        let total = self.used + 1;
        let mut m = Vec::with_capacity(self.rows() * total);
        for row in &self.valid {
            m.extend(row.iter().map(|&v| if v { 0f32 } else { f32::NEG_INFINITY }));
            m.push(0.0);
        }
        Ok(Some(Tensor::from_vec(m, (self.rows(), 1, 1, total), dev)?.to_dtype(dtype)?))
    }
}

/// Logits over a fixed subset of the vocabulary: a generation step that may only choose among a few
/// tokens need not multiply by the whole output matrix.
pub struct VocabSubset {
    pub ids: Vec<u32>,
    head: FrozenLinear,
}

impl VocabSubset {
    /// `[.., ids.len()]` logits of final hidden states `[.., hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        self.head.forward(hidden)
    }
}

impl Llama {
    /// A cache for one sequence that has seen nothing yet, with room for `capacity` tokens (it grows
    /// when they are more).
    pub fn new_cache(&self, capacity: usize) -> candle_core::Result<KvCache> {
        let shape = (self.cfg.kv_heads(), self.cfg.head_dim());
        KvCache::empty(1, self.cfg.num_hidden_layers, shape, capacity, &self.norm)
    }

    /// The output rows of `ids` (see [`VocabSubset`]).
    pub fn vocab_subset(&self, ids: &[u32]) -> candle_core::Result<VocabSubset> {
        Ok(VocabSubset { ids: ids.to_vec(), head: self.lm_head.select_rows(ids)? })
    }

    /// Final-normed hidden states `[rows, t, hidden]` of input embeddings `x` `[rows, t, hidden]`
    /// placed after the tokens `cache` holds, which is extended by them. Several new tokens per row
    /// (a prompt) need a cache of one row; a stacked cache takes one token per row.
    pub fn forward_cached(&self, x: &Tensor, cache: &mut KvCache) -> candle_core::Result<Tensor> {
        let (b, t, hidden) = x.dims3()?;
        if b != cache.rows() {
            candle_core::bail!("{b} rows of input for a cache of {} rows", cache.rows());
        }
        if t > 1 && b > 1 {
            candle_core::bail!("several new tokens per row need a cache of one row");
        }
        let (nh, nkv, hd) = (self.cfg.num_attention_heads, self.cfg.kv_heads(), self.cfg.head_dim());
        let starts: Vec<usize> = (0..b).map(|r| cache.len(r)).collect();
        let end = starts.iter().max().copied().unwrap_or(0) + t;
        if end > self.cfg.max_position_embeddings {
            candle_core::bail!("{end} tokens exceed the model's {} positions", self.cfg.max_position_embeddings);
        }
        // Packed as [rows * t, hidden], each row's tokens at its own next positions.
        let positions: Vec<u32> = starts.iter().flat_map(|&p| (p..p + t).map(|i| i as u32)).collect();
        let mask = if t == 1 { cache.mask(x.dtype(), x.device())? } else { None };
        cache.reserve(t)?;
        let (used, n_rep) = (cache.used, nh / nkv);
        let scale = 1.0 / (hd as f64).sqrt();
        let out = self.blocks_with(&x.reshape((b * t, hidden))?, positions, |layer, q, k, v| {
            if t > 1 {
                // A prompt (one row): fused causal attention after the row's cached slots.
                let past = if cache.len(0) > 0 { Some(cache.row_slots(layer, 0)?) } else { None };
                let (kbuf, vbuf) = &cache.layers[layer];
                kbuf.slice_set(&k.unsqueeze(0)?, 2, used)?;
                vbuf.slice_set(&v.unsqueeze(0)?, 2, used)?;
                return packed_attention(&q, &k, &v, &[t], past.as_ref().map(|(k, v)| (k, v)), scale, self.bf16);
            }
            // One token per row: [kv_heads, rows, hd] -> [rows, kv_heads, 1, hd] into the buffers.
            let (kbuf, vbuf) = &cache.layers[layer];
            kbuf.slice_set(&k.transpose(0, 1)?.unsqueeze(2)?.contiguous()?, 2, used)?;
            vbuf.slice_set(&v.transpose(0, 1)?.unsqueeze(2)?.contiguous()?, 2, used)?;
            let (k, v) = (kbuf.narrow(2, 0, used + 1)?, vbuf.narrow(2, 0, used + 1)?);
            // Grouped-query attention without copying keys per query head: the n_rep query heads
            // that share a key head are rows of one product.
            let q = q.transpose(0, 1)?.reshape((b, nkv, n_rep, hd))?;
            let mut scores = (q.matmul(&k.t()?)? * scale)?;
            if let Some(m) = &mask {
                scores = scores.broadcast_add(m)?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            probs.matmul(&v)?.reshape((b, nh, hd))?.transpose(0, 1)?.contiguous()
        })?;
        cache.used += t;
        for row in &mut cache.valid {
            row.extend(std::iter::repeat_n(true, t));
        }
        rms_norm(&out, &self.norm, self.cfg.rms_norm_eps)?.reshape((b, t, hidden))
    }
}

/// Index of the largest value of each row of `[rows, n]` logits.
pub fn argmax_rows(logits: &Tensor) -> candle_core::Result<Vec<u32>> {
    logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::super::{Llm, LlmSource, TinyLlmConfig};
    use super::*;

    fn tiny() -> Llm {
        let cfg = TinyLlmConfig { layers: 2, hidden: 64, heads: 4, kv_heads: 2, ..Default::default() };
        Llm::load(&LlmSource::Tiny(cfg), DType::F32, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn cached_steps_match_the_full_forward() {
        let llm = tiny();
        let ids: Vec<u32> = llm.encode("a red lamp, a blue chair and a green table").unwrap();
        let full = llm.model.forward_embeds(&llm.embed_ids(ids.clone(), 1).unwrap()).unwrap();
        // A prompt of 5 tokens, then one token at a time.
        let mut cache = llm.model.new_cache(4).unwrap();
        let mut outs =
            vec![llm.model.forward_cached(&llm.embed_ids(ids[..5].to_vec(), 1).unwrap(), &mut cache).unwrap()];
        for &id in &ids[5..] {
            outs.push(llm.model.forward_cached(&llm.embed_ids(vec![id], 1).unwrap(), &mut cache).unwrap());
        }
        let cached = Tensor::cat(&outs, 1).unwrap();
        assert!(max_diff(&full, &cached) < 1e-4, "{}", max_diff(&full, &cached));
        assert_eq!(cache.len(0), ids.len());
    }

    #[test]
    fn a_stacked_batch_of_different_lengths_decodes_as_each_row_alone() {
        let llm = tiny();
        let a = llm.encode("the red lamp").unwrap();
        let b = llm.encode("a much longer prompt about a blue chair").unwrap();
        let next = llm.encode(" and").unwrap()[0];
        let alone = |ids: &[u32]| {
            let mut c = llm.model.new_cache(8).unwrap();
            llm.model.forward_cached(&llm.embed_ids(ids.to_vec(), 1).unwrap(), &mut c).unwrap();
            let h = llm.model.forward_cached(&llm.embed_ids(vec![next], 1).unwrap(), &mut c).unwrap();
            (c, h)
        };
        let (ca, ha) = alone(&a);
        let (cb, hb) = alone(&b);
        // The same two rows, prompts prefilled apart and the last token decoded together.
        let prefill = |ids: &[u32]| {
            let mut c = llm.model.new_cache(8).unwrap();
            llm.model.forward_cached(&llm.embed_ids(ids.to_vec(), 1).unwrap(), &mut c).unwrap();
            c
        };
        let mut both = KvCache::stack(&[prefill(&a), prefill(&b)], 2).unwrap();
        let h = llm.model.forward_cached(&llm.embed_ids(vec![next, next], 2).unwrap(), &mut both).unwrap();
        assert!(max_diff(&h.narrow(0, 0, 1).unwrap(), &ha) < 1e-4);
        assert!(max_diff(&h.narrow(0, 1, 1).unwrap(), &hb) < 1e-4);
        assert_eq!((both.len(0), both.len(1)), (ca.len(0), cb.len(0)));
        // Dropping a finished row keeps the other's state.
        let mut only_b = both.select_rows(&[1]).unwrap();
        let h2 = llm.model.forward_cached(&llm.embed_ids(vec![next], 1).unwrap(), &mut only_b).unwrap();
        let mut cb2 = cb.fork(1).unwrap();
        let want = llm.model.forward_cached(&llm.embed_ids(vec![next], 1).unwrap(), &mut cb2).unwrap();
        assert!(max_diff(&h2, &want) < 1e-4);
        // Several tokens after a padded row (the shorter one, alone again) see its own slots only.
        let more = llm.encode(" and a green table").unwrap();
        let mut only_a = both.select_rows(&[0]).unwrap();
        let h3 = llm.model.forward_cached(&llm.embed_ids(more.clone(), 1).unwrap(), &mut only_a).unwrap();
        let mut ca2 = ca.fork(more.len()).unwrap();
        let want3 = llm.model.forward_cached(&llm.embed_ids(more.clone(), 1).unwrap(), &mut ca2).unwrap();
        assert!(max_diff(&h3, &want3) < 1e-4, "{}", max_diff(&h3, &want3));
        assert_eq!(only_a.len(0), ca.len(0) + more.len());
        // Logits over a few tokens equal those columns of the full logits.
        let sub = llm.model.vocab_subset(&[next, 3, 7]).unwrap();
        let full = llm.model.logits(&want).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let few = sub.logits(&want).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (k, id) in [next, 3, 7].iter().enumerate() {
            assert!((few[k] - full[*id as usize]).abs() < 1e-4);
        }
    }
}
