//! SASRec (Kang & McAuley, 2018): a causal self-attention encoder over a user's item sequence. The
//! hidden state at the last position scores every item by a dot product with the item-embedding
//! table, which is also the CF feature I-LLMRec uses.
//!
//! Layout per block, as in the reference implementation: Q = LN(x); x = Q + MHA(Q, x, x);
//! x = LN(x); x = x + FFN(x); x *= mask. A final LN gives the sequence's hidden states.

use candle_core::{Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use super::layers::{const_var, dropout_rows, layer_norm, linear, xavier_var};
use super::{HostTensor, Result, Scorer};
use crate::invalid::Invalid;
use crate::seed::Rng;

const LN_EPS: f64 = 1e-8;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SasRecConfig {
    #[serde(default = "d_hidden")]
    pub hidden: usize,
    #[serde(default = "d_blocks")]
    pub blocks: usize,
    #[serde(default = "d_heads")]
    pub heads: usize,
    #[serde(default = "d_max_len")]
    pub max_len: usize,
    #[serde(default = "d_dropout")]
    pub dropout: f64,
}

fn d_hidden() -> usize {
    50
}
fn d_blocks() -> usize {
    2
}
fn d_heads() -> usize {
    1
}
fn d_max_len() -> usize {
    50
}
fn d_dropout() -> f64 {
    0.2
}

impl Default for SasRecConfig {
    fn default() -> Self {
        Self { hidden: d_hidden(), blocks: d_blocks(), heads: d_heads(), max_len: d_max_len(), dropout: d_dropout() }
    }
}

impl SasRecConfig {
    pub fn validate(&self) -> std::result::Result<(), Invalid> {
        if self.hidden == 0 || self.heads == 0 || !self.hidden.is_multiple_of(self.heads) {
            return Err(Invalid::new(
                "heads",
                format!("hidden ({}) must be a positive multiple of heads ({})", self.hidden, self.heads),
            ));
        }
        if self.blocks == 0 || self.max_len == 0 {
            return Err(Invalid::new("blocks", "blocks and max_len must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Invalid::new("dropout", "must be in [0, 1)"));
        }
        Ok(())
    }
}

/// A batch of left-padded sequences of length `max_len` (0 = padding), kept on the host too.
pub struct Batch {
    pub ids: Vec<u32>,
    pub rows: usize,
}

impl Batch {
    /// The last `max_len` items of each sequence, left-padded with 0.
    pub fn from_sequences(seqs: &[&[u32]], max_len: usize) -> Self {
        let mut ids = vec![0u32; seqs.len() * max_len];
        for (r, s) in seqs.iter().enumerate() {
            let tail = &s[s.len().saturating_sub(max_len)..];
            ids[r * max_len + max_len - tail.len()..(r + 1) * max_len].copy_from_slice(tail);
        }
        Self { ids, rows: seqs.len() }
    }
}

/// Where the item vectors come from.
enum ItemSource {
    /// A trained id table (SASRec): `vars[0]` is [N + 1, hidden], row 0 padding.
    Table,
    /// Frozen item features [N + 1, d] through a trained linear layer to the model width (MoRec):
    /// `vars[0]` is the weight [d, hidden], `vars[1]` the bias.
    Projected(Tensor),
    /// IISAN's side networks over cached backbone states; their tensors lead `vars`.
    Adapted(Box<super::iisan::SideAdapters>),
}

impl ItemSource {
    /// How many of the leading `vars` are the item vectors' parameters.
    fn var_count(&self) -> usize {
        match self {
            ItemSource::Table => 1,
            ItemSource::Projected(_) => 2,
            ItemSource::Adapted(a) => a.vars().len(),
        }
    }
}

pub struct SasRec {
    pub cfg: SasRecConfig,
    pub num_items: usize,
    device: Device,
    items: ItemSource,
    /// Every trainable tensor, in a fixed order: the item source's, the position table, the blocks',
    /// the last layer norm's; names are the checkpoint's tensor names.
    vars: Vec<(String, Var)>,
}

/// Indices into `vars` of one block's tensors, in `BLOCK_PARAMS` order.
const BLOCK_PARAMS: [&str; 16] = [
    "attn_ln.w",
    "attn_ln.b",
    "wq",
    "bq",
    "wk",
    "bk",
    "wv",
    "bv",
    "wo",
    "bo",
    "ffn_ln.w",
    "ffn_ln.b",
    "w1",
    "b1",
    "w2",
    "b2",
];

impl SasRec {
    /// A freshly initialised model: xavier-normal matrices and embeddings (padding row zero), zero
    /// biases, unit layer-norm weights; all drawn from `rng`.
    pub fn new(cfg: SasRecConfig, num_items: usize, rng: &mut Rng, device: &Device) -> Result<Self> {
        let item = xavier_var(num_items + 1, cfg.hidden, rng, device)?;
        let mask: Vec<f32> = (0..=num_items).map(|i| if i == 0 { 0.0 } else { 1.0 }).collect();
        item.set(&item.as_tensor().broadcast_mul(&Tensor::from_vec(mask, (num_items + 1, 1), device)?)?)?;
        Self::with_items(cfg, num_items, ItemSource::Table, vec![("item_emb".to_string(), item)], rng, device)
    }

    /// MoRec: the same encoder whose item vectors are frozen item features `features` ([N + 1, d],
    /// row 0 padding) through a trained linear layer (xavier weight, zero bias) to the model width.
    pub fn with_features(cfg: SasRecConfig, features: Tensor, rng: &mut Rng, device: &Device) -> Result<Self> {
        let (rows, d) = features.dims2()?;
        let num_items = rows.saturating_sub(1);
        let vars = vec![
            ("item_proj.w".to_string(), xavier_var(d, cfg.hidden, rng, device)?),
            ("item_proj.b".to_string(), const_var(cfg.hidden, 0.0, device)?),
        ];
        Self::with_items(cfg, num_items, ItemSource::Projected(features), vars, rng, device)
    }

    /// IISAN: the same encoder whose item vectors come from side networks over frozen backbone
    /// states.
    pub fn with_side_adapters(
        cfg: SasRecConfig,
        adapters: super::iisan::SideAdapters,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        let (num_items, vars) = (adapters.num_items(), adapters.vars().to_vec());
        Self::with_items(cfg, num_items, ItemSource::Adapted(Box::new(adapters)), vars, rng, device)
    }

    fn with_items(
        cfg: SasRecConfig,
        num_items: usize,
        items: ItemSource,
        mut vars: Vec<(String, Var)>,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        let h = cfg.hidden;
        vars.push(("pos_emb".to_string(), xavier_var(cfg.max_len, h, rng, device)?));
        for b in 0..cfg.blocks {
            for name in BLOCK_PARAMS {
                let v = match name {
                    "attn_ln.w" | "ffn_ln.w" => const_var(h, 1.0, device)?,
                    n if n.starts_with('b') || n.ends_with(".b") => const_var(h, 0.0, device)?,
                    _ => xavier_var(h, h, rng, device)?,
                };
                vars.push((format!("block{b}.{name}"), v));
            }
        }
        vars.push(("last_ln.w".to_string(), const_var(h, 1.0, device)?));
        vars.push(("last_ln.b".to_string(), const_var(h, 0.0, device)?));
        Ok(Self { cfg, num_items, device: device.clone(), items, vars })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    fn t(&self, i: usize) -> &Tensor {
        self.vars[i].1.as_tensor()
    }

    /// The vectors of the items `ids` (any shape of u32 indices, flattened): [ids, hidden].
    fn item_vectors(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match &self.items {
            ItemSource::Table => self.t(0).index_select(ids, 0),
            ItemSource::Projected(f) => linear(&f.index_select(ids, 0)?, self.t(0), self.t(1)),
            ItemSource::Adapted(a) => a.item_vectors(ids),
        }
    }

    /// Every item's vector, [N + 1, hidden] (row 0 padding): the table that scores items, and
    /// SASRec's CF feature.
    pub fn item_embeddings(&self) -> candle_core::Result<Tensor> {
        match &self.items {
            ItemSource::Table => Ok(self.t(0).clone()),
            ItemSource::Projected(f) => linear(f, self.t(0), self.t(1)),
            ItemSource::Adapted(a) => a.item_vectors(&Tensor::arange(0u32, self.num_items as u32 + 1, &self.device)?),
        }
    }

    /// Replaces the item table with `values` (`[(num_items + 1) x hidden]`, row 0 the padding); a
    /// SASRec with an id table only (MoRec's item vectors are projected features).
    pub fn set_item_table(&self, values: &[f32]) -> Result<()> {
        if !matches!(self.items, ItemSource::Table) {
            return Err(super::ModelError::Invalid("projected item features have no item table to set".into()));
        }
        let shape = (self.num_items + 1, self.cfg.hidden);
        if values.len() != shape.0 * shape.1 {
            return Err(super::ModelError::Invalid(format!(
                "an item table of {} values for {} items x {} dims",
                values.len(),
                self.num_items,
                self.cfg.hidden
            )));
        }
        Ok(self.vars[0].1.set(&Tensor::from_slice(values, shape, &self.device)?)?)
    }

    /// Hidden states [rows, max_len, hidden]; dropout is applied when `rngs` (one stream per row) is
    /// given (training).
    pub fn forward(&self, batch: &Batch, mut rngs: Option<&mut [Rng]>) -> Result<Tensor> {
        let (l, h, heads) = (self.cfg.max_len, self.cfg.hidden, self.cfg.heads);
        let b = batch.rows;
        let p = self.cfg.dropout;
        let ids = Tensor::from_vec(batch.ids.clone(), b * l, &self.device)?;
        let keep: Vec<f32> = batch.ids.iter().map(|&i| if i == 0 { 0.0 } else { 1.0 }).collect();
        let timeline = Tensor::from_vec(keep, (b, l, 1), &self.device)?;
        let body = self.items.var_count();
        let mut x = self.item_vectors(&ids)?.reshape((b, l, h))?.affine((h as f64).sqrt(), 0.0)?;
        x = x.broadcast_add(self.t(body))?;
        x = dropout_rows(&x, p, rngs.as_deref_mut())?.broadcast_mul(&timeline)?;
        let causal = causal_mask(l, &self.device)?;
        let d = h / heads;
        for blk in 0..self.cfg.blocks {
            let o = body + 1 + blk * BLOCK_PARAMS.len();
            let q_in = layer_norm(&x, self.t(o), self.t(o + 1), LN_EPS)?;
            let split = |t: Tensor| -> candle_core::Result<Tensor> {
                t.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous()
            };
            let q = split(linear(&q_in, self.t(o + 2), self.t(o + 3))?)?;
            let k = split(linear(&x, self.t(o + 4), self.t(o + 5))?)?;
            let v = split(linear(&x, self.t(o + 6), self.t(o + 7))?)?;
            let scores = q
                .matmul(&k.transpose(2, 3)?.contiguous()?)?
                .affine(1.0 / (d as f64).sqrt(), 0.0)?
                .broadcast_add(&causal)?;
            let attn = dropout_rows(&candle_nn::ops::softmax(&scores, D::Minus1)?, p, rngs.as_deref_mut())?;
            let ctx = attn.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((b, l, h))?;
            x = (q_in + linear(&ctx, self.t(o + 8), self.t(o + 9))?)?;
            x = layer_norm(&x, self.t(o + 10), self.t(o + 11), LN_EPS)?;
            let inner = dropout_rows(&linear(&x, self.t(o + 12), self.t(o + 13))?, p, rngs.as_deref_mut())?.relu()?;
            let ffn = dropout_rows(&linear(&inner, self.t(o + 14), self.t(o + 15))?, p, rngs.as_deref_mut())?;
            x = (x + ffn)?.broadcast_mul(&timeline)?;
        }
        let n = self.vars.len();
        Ok(layer_norm(&x, self.t(n - 2), self.t(n - 1), LN_EPS)?)
    }

    /// The training loss for one batch: BCE of the next item (positive) and one sampled negative at
    /// every non-padded position, summed and divided by `total` (the non-padded positions of the
    /// global batch this batch is a share of). `rngs`: one dropout stream per row.
    pub fn loss(
        &self,
        input: &Batch,
        positives: &[u32],
        negatives: &[u32],
        rngs: &mut [Rng],
        total: f64,
    ) -> Result<Tensor> {
        let (b, l, h) = (input.rows, self.cfg.max_len, self.cfg.hidden);
        let states = self.forward(input, Some(rngs))?;
        let logits = |items: &[u32]| -> candle_core::Result<Tensor> {
            let ids = Tensor::from_vec(items.to_vec(), b * l, &self.device)?;
            let emb = self.item_vectors(&ids)?.reshape((b, l, h))?;
            (&states * emb)?.sum(D::Minus1)
        };
        let weight: Vec<f32> = positives.iter().map(|&p| if p == 0 { 0.0 } else { 1.0 }).collect();
        let weight = Tensor::from_vec(weight, (b, l), &self.device)?;
        let pos = super::layers::bce_with_logits(&logits(positives)?, 1.0, &weight, total)?;
        let neg = super::layers::bce_with_logits(&logits(negatives)?, 0.0, &weight, total)?;
        Ok((pos + neg)?)
    }

    /// IISAN's training loss: at every non-padded position, softmax cross-entropy of the next item
    /// against `candidates` (the global batch's distinct next items, sorted: in-batch negatives),
    /// summed and divided by `total` (the global batch's non-padded positions).
    pub fn in_batch_loss(
        &self,
        input: &Batch,
        positives: &[u32],
        candidates: &[u32],
        rngs: &mut [Rng],
        total: f64,
    ) -> Result<Tensor> {
        let (b, l, h) = (input.rows, self.cfg.max_len, self.cfg.hidden);
        let states = self.forward(input, Some(rngs))?.reshape((b * l, h))?;
        let mut rows = Vec::new();
        let mut labels = Vec::new();
        for (r, p) in positives.iter().enumerate().filter(|(_, &p)| p != 0) {
            let col = candidates.binary_search(p).map_err(|_| {
                super::ModelError::Invalid(format!("next item {p} is not among the batch's candidates"))
            })?;
            rows.push(r as u32);
            labels.push(col as u32);
        }
        let n = rows.len();
        let items = self.item_vectors(&Tensor::from_slice(candidates, candidates.len(), &self.device)?)?;
        let queries = states.index_select(&Tensor::from_vec(rows, n, &self.device)?, 0)?;
        let log_p = candle_nn::ops::log_softmax(&queries.matmul(&items.t()?)?, D::Minus1)?;
        let picked = log_p.gather(&Tensor::from_vec(labels, (n, 1), &self.device)?, 1)?;
        Ok(picked.sum_all()?.affine(-1.0 / total.max(1.0), 0.0)?)
    }

    /// Host copies of every tensor, for checkpoints.
    pub fn to_host(&self) -> Result<Vec<HostTensor>> {
        super::vars_to_host(&self.vars)
    }

    /// Overwrites every tensor from host copies (names and shapes must match).
    pub fn load_host(&self, tensors: &[HostTensor]) -> Result<()> {
        super::load_host_into(&self.vars, tensors)
    }
}

/// [l, l] additive mask: 0 where a position may attend (itself and earlier), a large negative elsewhere.
fn causal_mask(l: usize, device: &Device) -> candle_core::Result<Tensor> {
    let m: Vec<f32> = (0..l * l).map(|i| if i % l > i / l { -1e9 } else { 0.0 }).collect();
    Tensor::from_vec(m, (l, l), device)
}

impl Scorer for SasRec {
    fn score(&self, histories: &[&[u32]]) -> Result<Vec<f32>> {
        let batch = Batch::from_sequences(histories, self.cfg.max_len);
        let states = self.forward(&batch, None)?;
        let last = states.narrow(1, self.cfg.max_len - 1, 1)?.squeeze(1)?;
        let scores = last.matmul(&self.item_embeddings()?.t()?)?;
        Ok(scores.flatten_all()?.to_vec1::<f32>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rngs(n: u64) -> Vec<Rng> {
        (0..n).map(|r| crate::seed::stream(1, "d", r)).collect()
    }

    fn tiny() -> SasRec {
        let cfg = SasRecConfig { hidden: 8, blocks: 2, heads: 2, max_len: 5, dropout: 0.2 };
        SasRec::new(cfg, 12, &mut crate::seed::stream(1, "t", 0), &Device::Cpu).unwrap()
    }

    #[test]
    fn batches_are_left_padded_to_the_last_items() {
        let b = Batch::from_sequences(&[&[1, 2], &[1, 2, 3, 4, 5, 6, 7]], 4);
        assert_eq!(b.ids, vec![0, 0, 1, 2, 4, 5, 6, 7]);
    }

    #[test]
    fn every_parameter_gets_a_finite_gradient() {
        let m = tiny();
        let input = Batch::from_sequences(&[&[1, 2, 3], &[4, 5, 6, 7, 8]], 5);
        let pos = Batch::from_sequences(&[&[2, 3, 9], &[5, 6, 7, 8, 10]], 5).ids;
        let neg = vec![11u32; pos.len()];
        let total = pos.iter().filter(|&&p| p != 0).count() as f64;
        let loss = m.loss(&input, &pos, &neg, &mut rngs(2), total).unwrap();
        let grads = loss.backward().unwrap();
        for (name, v) in m.vars() {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
            let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(g.iter().all(|x| x.is_finite()), "{name}");
            // A key bias shifts every score of a query equally, and softmax ignores such shifts:
            // its gradient is zero by design.
            if !name.ends_with(".bk") {
                assert!(g.iter().any(|&x| x != 0.0), "zero gradient for {name}");
            }
        }
    }

    #[test]
    fn morec_projects_concatenated_features_to_the_model_width() {
        // 12 items with a 3-d text and a 2-d image feature side by side (row 0 padding); items 4
        // and 5 have the same features, so they must get the same vector and the same score.
        let mut values: Vec<f32> = (0..13 * 5).map(|v| ((v * 7) % 11) as f32 / 11.0).collect();
        values[..5].fill(0.0);
        let five: Vec<f32> = values[4 * 5..5 * 5].to_vec();
        values[5 * 5..6 * 5].copy_from_slice(&five);
        let feats = Tensor::from_vec(values, (13, 5), &Device::Cpu).unwrap();
        let cfg = SasRecConfig { hidden: 8, blocks: 1, heads: 2, max_len: 4, dropout: 0.1 };
        let m = SasRec::with_features(cfg, feats, &mut crate::seed::stream(1, "t", 0), &Device::Cpu).unwrap();
        assert_eq!(m.num_items, 12);
        let shapes: Vec<(&str, Vec<usize>)> =
            m.vars()[..3].iter().map(|(n, v)| (n.as_str(), v.dims().to_vec())).collect();
        assert_eq!(shapes, [("item_proj.w", vec![5, 8]), ("item_proj.b", vec![8]), ("pos_emb", vec![4, 8])]);
        assert_eq!(m.item_embeddings().unwrap().dims(), &[13, 8]);
        let s = m.score(&[&[1, 2, 3]]).unwrap();
        assert_eq!(s.len(), 13);
        assert_eq!(s[4], s[5]);
        let input = Batch::from_sequences(&[&[1, 2, 3]], 4);
        let pos = Batch::from_sequences(&[&[2, 3, 6]], 4).ids;
        let loss = m.loss(&input, &pos, &[0, 9, 9, 9], &mut rngs(1), 3.0).unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(m.vars()[0].1.as_tensor()).expect("the projection learns");
        assert_eq!(g.dims(), &[5, 8]);
        assert!(g.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().any(|&v| v != 0.0));
    }

    #[test]
    fn scores_depend_only_on_the_past_and_ignore_padding() {
        let m = tiny();
        // Longer-than-max_len history: only the last 5 items count.
        let a = m.score(&[&[9, 1, 2, 3, 4, 5]]).unwrap();
        let b = m.score(&[&[1, 2, 3, 4, 5]]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 13);
    }

    #[test]
    fn the_in_batch_loss_is_cross_entropy_over_the_batchs_next_items() {
        // No dropout, so the loss can be recomputed from the scores: every non-padded position
        // against the distinct next items {1, 2, 3, 5}.
        let cfg = SasRecConfig { hidden: 8, blocks: 1, heads: 2, max_len: 3, dropout: 0.0 };
        let m = SasRec::new(cfg, 6, &mut crate::seed::stream(1, "t", 0), &Device::Cpu).unwrap();
        let input = Batch::from_sequences(&[&[1, 2], &[4, 1, 2]], 3);
        let pos = Batch::from_sequences(&[&[2, 3], &[1, 2, 5]], 3).ids;
        let loss = m.in_batch_loss(&input, &pos, &[1, 2, 3, 5], &mut rngs(2), 5.0).unwrap();
        let states = m.forward(&input, None).unwrap().reshape((6, 8)).unwrap().to_vec2::<f32>().unwrap();
        let table = m.item_embeddings().unwrap().to_vec2::<f32>().unwrap();
        let dot = |r: usize, i: usize| -> f32 { (0..8).map(|k| states[r][k] * table[i][k]).sum() };
        let (targets, mut sum, mut count) = ([1u32, 2, 3, 5], 0.0, 0);
        for (r, &p) in pos.iter().enumerate() {
            if p == 0 {
                continue;
            }
            let lse = targets.iter().map(|&t| dot(r, t as usize).exp()).sum::<f32>().ln();
            sum += lse - dot(r, p as usize);
            count += 1;
        }
        let expected = sum / count as f32;
        let got = loss.to_scalar::<f32>().unwrap();
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    }

    #[test]
    fn a_batch_split_in_two_sums_to_the_whole_batchs_loss_dropout_included() {
        // What data-parallel training relies on: each row's dropout comes from its own stream and
        // each share divides by the whole batch's positions.
        let m = tiny();
        let seqs: [&[u32]; 3] = [&[1, 2, 3], &[4, 5, 6, 7, 8], &[9, 1]];
        let nexts: [&[u32]; 3] = [&[2, 3, 9], &[5, 6, 7, 8, 10], &[1, 4]];
        let pos = Batch::from_sequences(&nexts, 5).ids;
        let neg: Vec<u32> = pos.iter().map(|&p| if p == 0 { 0 } else { 11 }).collect();
        let total = pos.iter().filter(|&&p| p != 0).count() as f64;
        let all = rngs(3);
        let whole = m.loss(&Batch::from_sequences(&seqs, 5), &pos, &neg, &mut all.clone(), total).unwrap();
        let first = m.loss(&Batch::from_sequences(&seqs[..1], 5), &pos[..5], &neg[..5], &mut all[..1].to_vec(), total);
        let rest = m.loss(&Batch::from_sequences(&seqs[1..], 5), &pos[5..], &neg[5..], &mut all[1..].to_vec(), total);
        let split = first.unwrap().to_scalar::<f32>().unwrap() + rest.unwrap().to_scalar::<f32>().unwrap();
        assert!((whole.to_scalar::<f32>().unwrap() - split).abs() < 1e-5);
    }
}
