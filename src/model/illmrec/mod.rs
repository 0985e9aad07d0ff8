//! I-LLMRec's trainable parts around the frozen LLM (docs/illmrec-method.md, "Trainable parts", "Loss"):
//! the adaptor that turns an item feature into one LLM token, the learnable [REC] vector, user- and
//! item-side projection heads per feature type, the two losses, and retrieval scores.

pub mod batch;
pub mod gru;
pub mod scorer;
pub mod session;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::Rng as _;
use serde::{Deserialize, Serialize};

use super::layers::{bce_with_logits, layer_norm, linear};
use super::llm::{embed_with, Llm};
use super::{HostTensor, ModelError, Result};
use crate::data::prompt::Variant;
use crate::data::FeatureKind;
use crate::invalid::Invalid;
use crate::seed::Rng;
use batch::EncodedBatch;

/// The `model.illmrec` section.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IllmRecConfig {
    /// The feature each history item's token is made from (the paper: image).
    #[serde(default = "d_token")]
    pub token_feature: FeatureKind,
    /// Used through its own adaptor for items that lack the token feature (the paper's missing-image
    /// case: text).
    #[serde(default = "d_fallback")]
    pub fallback_feature: Option<FeatureKind>,
    /// Feature types with a retrieval head pair; an item's score is the mean over those it has.
    #[serde(default = "d_retrieval")]
    pub retrieval: Vec<FeatureKind>,
    #[serde(default = "d_512")]
    pub adaptor_hidden: usize,
    #[serde(default = "d_512")]
    pub head_dim: usize,
    /// History items in a prompt at most (training windows are capped at this or half of it).
    #[serde(default = "d_history")]
    pub max_history: usize,
    /// Words of an item's description in the description variants.
    #[serde(default = "d_desc_words")]
    pub max_description_words: usize,
    /// Also tune the LLM's input-embedding matrix, as the authors' code does (the LM head stays frozen).
    #[serde(default)]
    pub train_input_embeddings: bool,
    /// How a user head's output and an item head's output make a score: `dot` (the paper) or
    /// `cosine` divided by `temperature`, whose logits stay in a fixed range however the heads grow.
    #[serde(default)]
    pub similarity: Similarity,
    /// The divisor of cosine scores (ignored for `dot`).
    #[serde(default = "d_temperature")]
    pub temperature: f64,
    /// What turns a prompt into the user state: the frozen `llm` (I-LLMRec), or, to measure what
    /// the LLM adds, a trained `gru` over the prompt's item tokens alone (no L_RISA). Left out of
    /// the serialized config when it is the LLM, so runs trained before the option resume.
    #[serde(default, skip_serializing_if = "Backbone::is_llm")]
    pub backbone: Backbone,
}

/// Whether a forward keeps its graph for a backward (training) or leaves none (scoring). Without a
/// graph each activation is freed as soon as the next layer has read it: with one, a scoring batch
/// of 16 prompts of ~430 tokens holds every layer's activations (12 GB per rank on SmolLM2-135M).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Graph {
    Keep,
    Drop,
}

impl Graph {
    /// `x` as this forward needs it: cut from the trainable tensors under `Drop`.
    fn apply(self, x: Tensor) -> Tensor {
        match self {
            Graph::Keep => x,
            Graph::Drop => x.detach(),
        }
    }
}

/// What reads a prompt and gives the user state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backbone {
    #[default]
    Llm,
    Gru,
}

impl Backbone {
    fn is_llm(&self) -> bool {
        *self == Backbone::Llm
    }
}

/// How user and item vectors make a score.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Similarity {
    #[default]
    Dot,
    Cosine,
}

/// The retrieval loss over a target and its sampled negatives, per feature type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RetrievalLoss {
    /// Binary cross-entropy: the target labelled 1, each negative 0 (the paper, with one negative);
    /// per window the negatives' terms are summed, so each weighs as much as the target's.
    #[default]
    Bce,
    /// Cross-entropy of the target among itself and the negatives (a sampled softmax).
    Softmax,
}

fn d_token() -> FeatureKind {
    FeatureKind::Image
}
fn d_fallback() -> Option<FeatureKind> {
    Some(FeatureKind::Text)
}
fn d_retrieval() -> Vec<FeatureKind> {
    vec![FeatureKind::Image]
}
fn d_512() -> usize {
    512
}
fn d_history() -> usize {
    10
}
fn d_desc_words() -> usize {
    100
}
fn d_temperature() -> f64 {
    0.1
}

impl Default for IllmRecConfig {
    fn default() -> Self {
        Self {
            token_feature: d_token(),
            fallback_feature: d_fallback(),
            retrieval: d_retrieval(),
            adaptor_hidden: d_512(),
            head_dim: d_512(),
            max_history: d_history(),
            max_description_words: d_desc_words(),
            train_input_embeddings: false,
            similarity: Similarity::Dot,
            temperature: d_temperature(),
            backbone: Backbone::Llm,
        }
    }
}

impl IllmRecConfig {
    pub fn validate(&self) -> std::result::Result<(), Invalid> {
        if self.retrieval.is_empty() {
            return Err(Invalid::new("retrieval", "needs at least one feature type"));
        }
        if self.fallback_feature == Some(self.token_feature) {
            return Err(Invalid::new("fallback_feature", "must differ from token_feature"));
        }
        if self.adaptor_hidden == 0 || self.head_dim == 0 {
            return Err(Invalid::new("head_dim", "adaptor_hidden and head_dim must be positive"));
        }
        if self.max_history < 2 {
            return Err(Invalid::new("max_history", "must be at least 2"));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(Invalid::new("temperature", "must be a positive number"));
        }
        Ok(())
    }

    /// Every feature type the model reads, for a prompt variant.
    pub fn feature_kinds(&self, variant: Variant) -> Vec<FeatureKind> {
        let mut k: Vec<FeatureKind> = self.retrieval.clone();
        if variant.has_item_token() {
            k.push(self.token_feature);
            k.extend(self.fallback_feature);
        }
        k.sort();
        k.dedup();
        k
    }
}

/// Item features on the model's device, with a mask of the items that have them.
pub struct FeatureMatrix {
    pub kind: FeatureKind,
    pub values: Tensor,
    pub present: Vec<bool>,
    pub present_t: Tensor,
}

impl FeatureMatrix {
    /// `values`: `present.len() * dim` row-major values, row i = item i.
    pub fn new(
        kind: FeatureKind,
        dim: usize,
        values: &[f32],
        present: &[bool],
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let rows = present.len();
        let values = Tensor::from_slice(values, (rows, dim), device)?.to_dtype(dtype)?;
        let mask: Vec<f32> = present.iter().map(|&p| if p { 1.0 } else { 0.0 }).collect();
        let present_t = Tensor::from_vec(mask, rows, device)?.to_dtype(dtype)?;
        Ok(Self { kind, values, present: present.to_vec(), present_t })
    }

    fn dim(&self) -> usize {
        self.values.dim(1).unwrap_or(0)
    }
}

pub type Features = BTreeMap<FeatureKind, FeatureMatrix>;

#[derive(Clone, Copy)]
enum Activation {
    Gelu,
    Relu,
}

/// Linear(in -> mid) -> LayerNorm -> activation -> Linear(mid -> out): the adaptor (GELU, eps 1e-8)
/// and the projection heads (ReLU, mid = 2 * out) share this shape.
struct TwoLayer {
    w1: Var,
    b1: Var,
    ln_w: Var,
    ln_b: Var,
    w2: Var,
    b2: Var,
    act: Activation,
    eps: f64,
}

/// PyTorch's default Linear init: weight and bias uniform in ±1/sqrt(fan_in).
fn uniform(shape: &[usize], bound: f64, rng: &mut Rng, dtype: DType, device: &Device) -> Result<Var> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound) as f32).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)?)
}

impl TwoLayer {
    fn new(
        dims: (usize, usize, usize),
        act: Activation,
        eps: f64,
        rng: &mut Rng,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (i, m, o) = dims;
        let (bi, bm) = (1.0 / (i as f64).sqrt(), 1.0 / (m as f64).sqrt());
        let cst = |n: usize, v: f64| -> Result<Var> {
            Ok(Var::from_tensor(&Tensor::ones(n, dtype, device)?.affine(v, 0.0)?)?)
        };
        Ok(Self {
            w1: uniform(&[i, m], bi, rng, dtype, device)?,
            b1: uniform(&[m], bi, rng, dtype, device)?,
            ln_w: cst(m, 1.0)?,
            ln_b: cst(m, 0.0)?,
            w2: uniform(&[m, o], bm, rng, dtype, device)?,
            b2: uniform(&[o], bm, rng, dtype, device)?,
            act,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = layer_norm(&linear(x, &self.w1, &self.b1)?, &self.ln_w, &self.ln_b, self.eps)?;
        let h = match self.act {
            Activation::Gelu => h.gelu_erf()?,
            Activation::Relu => h.relu()?,
        };
        linear(&h, &self.w2, &self.b2)
    }

    fn named(&self, prefix: &str, out: &mut Vec<(String, Var)>) {
        for (n, v) in [
            ("w1", &self.w1),
            ("b1", &self.b1),
            ("ln_w", &self.ln_w),
            ("ln_b", &self.ln_b),
            ("w2", &self.w2),
            ("b2", &self.b2),
        ] {
            out.push((format!("{prefix}.{n}"), v.clone()));
        }
    }
}

/// The trainable set of one I-LLMRec model.
pub struct IllmRec {
    pub cfg: IllmRecConfig,
    pub variant: Variant,
    adaptor: Option<TwoLayer>,
    fallback: Option<TwoLayer>,
    rec: Var,
    user_heads: Vec<(FeatureKind, TwoLayer)>,
    item_heads: Vec<(FeatureKind, TwoLayer)>,
    embeddings: Option<Var>,
    /// The ablation backbone in the LLM's place (`backbone: gru`).
    gru: Option<gru::Gru>,
    /// Every trainable tensor with its checkpoint name, in a fixed order (the all-reduce order).
    vars: Vec<(String, Var)>,
}

impl IllmRec {
    /// A freshly initialised trainable set for an LLM of `llm`'s width and the given feature
    /// dimensions.
    pub fn new(
        cfg: &IllmRecConfig,
        variant: Variant,
        llm: &Llm,
        dims: &BTreeMap<FeatureKind, usize>,
        rng: &mut Rng,
    ) -> Result<Self> {
        let (h, dtype, device) = (llm.hidden_size(), llm.model.dtype(), llm.model.device().clone());
        let dim = |k: FeatureKind| {
            dims.get(&k).copied().ok_or_else(|| ModelError::Invalid(format!("no {k} features are loaded")))
        };
        let mut vars = Vec::new();
        let adapt = |kind: FeatureKind, name: &str, rng: &mut Rng, vars: &mut Vec<(String, Var)>| -> Result<TwoLayer> {
            let a = TwoLayer::new((dim(kind)?, cfg.adaptor_hidden, h), Activation::Gelu, 1e-8, rng, dtype, &device)?;
            a.named(name, vars);
            Ok(a)
        };
        let (adaptor, fallback) = if variant.has_item_token() {
            let a = adapt(cfg.token_feature, "adaptor", rng, &mut vars)?;
            let f = match cfg.fallback_feature {
                Some(k) => Some(adapt(k, "fallback_adaptor", rng, &mut vars)?),
                None => None,
            };
            (Some(a), f)
        } else {
            (None, None)
        };
        let bound = (6.0 / (1 + h) as f64).sqrt();
        let rec = uniform(&[h], bound, rng, dtype, &device)?;
        vars.push(("rec".to_string(), rec.clone()));
        let d = cfg.head_dim;
        let (mut user_heads, mut item_heads) = (Vec::new(), Vec::new());
        for &k in &cfg.retrieval {
            let u = TwoLayer::new((h, 2 * d, d), Activation::Relu, 1e-5, rng, dtype, &device)?;
            u.named(&format!("user_head.{k}"), &mut vars);
            user_heads.push((k, u));
            let i = TwoLayer::new((dim(k)?, 2 * d, d), Activation::Relu, 1e-5, rng, dtype, &device)?;
            i.named(&format!("item_head.{k}"), &mut vars);
            item_heads.push((k, i));
        }
        let gru = match cfg.backbone {
            Backbone::Llm => None,
            Backbone::Gru if !variant.has_item_token() => {
                return Err(ModelError::Invalid(format!(
                    "backbone gru reads item tokens; the `{}` prompts have none",
                    variant.name()
                )))
            }
            Backbone::Gru => {
                let g = gru::Gru::new(h, rng, dtype, &device)?;
                g.named(&mut vars);
                Some(g)
            }
        };
        let embeddings = if cfg.train_input_embeddings {
            let e = Var::from_tensor(llm.model.embedding_matrix())?;
            vars.push(("input_embeddings".to_string(), e.clone()));
            Some(e)
        } else {
            None
        };
        Ok(Self { cfg: cfg.clone(), variant, adaptor, fallback, rec, user_heads, item_heads, embeddings, gru, vars })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Trainable values in all.
    pub fn num_parameters(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Whether batches may leave their shared prompt prefix to the LLM's cache: not when the input
    /// embeddings are trained (the prefix's embeddings then change every step).
    pub fn caches_prefix(&self) -> bool {
        self.embeddings.is_none()
    }

    /// Input embeddings `[tokens, hidden]` of a packed batch: token embeddings with item-token slots
    /// and [REC] overwritten by the adaptor's outputs and the [REC] vector.
    fn inputs(&self, llm: &Llm, b: &EncodedBatch, feats: &Features) -> Result<Tensor> {
        let device = llm.model.device();
        let h = llm.hidden_size();
        let n = b.tokens();
        let ids = Tensor::from_slice(&b.ids, (1, n), device)?;
        let tokens = match &self.embeddings {
            Some(e) => embed_with(e.as_tensor(), &ids)?,
            None => llm.model.embed(&ids)?,
        };
        let tokens = tokens.reshape((n, h))?;
        let mut positions: Vec<u32> = b.slot_pos.clone();
        positions.extend(&b.rec_pos);
        if positions.is_empty() {
            return Ok(tokens);
        }
        let mut keep = vec![1f32; n];
        for &p in &positions {
            keep[p as usize] = 0.0;
        }
        let keep = Tensor::from_vec(keep, (n, 1), device)?.to_dtype(tokens.dtype())?;
        let mut values = Vec::new();
        if !b.slot_items.is_empty() {
            values.push(self.item_tokens(&b.slot_items, feats, device)?);
        }
        if !b.rec_pos.is_empty() {
            values.push(self.rec.as_tensor().unsqueeze(0)?.broadcast_as((b.rec_pos.len(), h))?.contiguous()?);
        }
        let values = Tensor::cat(&values, 0)?;
        let positions = Tensor::from_vec(positions, values.dim(0)?, device)?;
        Ok(tokens.broadcast_mul(&keep)?.index_add(&positions, &values, 0)?)
    }

    /// The LLM's final hidden states `[tokens, hidden]` of a packed batch, after its cached prefix.
    fn hidden(&self, llm: &Llm, b: &EncodedBatch, feats: &Features, graph: Graph) -> Result<Tensor> {
        let x = graph.apply(self.inputs(llm, b, feats)?);
        let prefix = if b.prefix.is_empty() { None } else { Some(llm.prefix(&b.prefix)?) };
        Ok(llm.model.forward_packed(&x, &b.lens, prefix.as_deref())?)
    }

    /// The adapted token of each item: from the token feature, or through the fallback adaptor for
    /// items that lack it.
    fn item_tokens(&self, items: &[u32], feats: &Features, device: &Device) -> Result<Tensor> {
        let adaptor =
            self.adaptor.as_ref().ok_or_else(|| ModelError::Invalid("this variant has no item tokens".into()))?;
        let token = feature(feats, self.cfg.token_feature)?;
        let idx = Tensor::from_slice(items, items.len(), device)?;
        let primary = adaptor.forward(&token.values.index_select(&idx, 0)?)?;
        let missing: Vec<u32> = items.iter().copied().filter(|&i| !token.present[i as usize]).collect();
        if missing.is_empty() {
            return Ok(primary);
        }
        let (Some(fb), Some(kind)) = (&self.fallback, self.cfg.fallback_feature) else {
            return Err(ModelError::Invalid(format!(
                "item {} has no {} feature and model.illmrec.fallback_feature is not set",
                missing[0], self.cfg.token_feature
            )));
        };
        let alt = fb.forward(&feature(feats, kind)?.values.index_select(&idx, 0)?)?;
        let m = token.present_t.index_select(&idx, 0)?.unsqueeze(1)?;
        let one_minus = m.affine(-1.0, 1.0)?;
        Ok((primary.broadcast_mul(&m)? + alt.broadcast_mul(&one_minus)?)?)
    }

    /// The user states: final hidden states at the [REC] positions, `[rows, hidden]` (with the GRU
    /// backbone, its last states over each row's item tokens).
    pub fn user_states(&self, llm: &Llm, b: &EncodedBatch, feats: &Features, graph: Graph) -> Result<Tensor> {
        if let Some(g) = &self.gru {
            // The GRU is small and trained: its states are cut after it.
            return Ok(graph.apply(self.gru_states(g, b, feats, llm.model.device())?));
        }
        let hidden = self.hidden(llm, b, feats, graph)?;
        let idx = Tensor::from_slice(&b.rec_pos, b.rec_pos.len(), llm.model.device())?;
        Ok(hidden.index_select(&idx, 0)?)
    }

    /// The GRU's last state over each [REC] row's item tokens in prompt order, `[rows, hidden]`.
    fn gru_states(&self, g: &gru::Gru, b: &EncodedBatch, feats: &Features, device: &Device) -> Result<Tensor> {
        // Row r of the packed batch holds positions [ends[r - 1], ends[r]).
        let mut ends = Vec::with_capacity(b.lens.len());
        let mut end = 0u32;
        for &l in &b.lens {
            end += l as u32;
            ends.push(end);
        }
        let row_of = |p: u32| ends.partition_point(|&e| e <= p);
        let mut slots_of: Vec<Vec<u32>> = vec![Vec::new(); b.lens.len()];
        for (s, &p) in b.slot_pos.iter().enumerate() {
            slots_of[row_of(p)].push(s as u32);
        }
        let rows: Vec<usize> = b.rec_pos.iter().map(|&p| row_of(p)).collect();
        let steps = rows.iter().map(|&r| slots_of[r].len()).max().unwrap_or(0).max(1);
        let w = g.width();
        let mut tokens = Vec::new();
        if !b.slot_items.is_empty() {
            tokens.push(self.item_tokens(&b.slot_items, feats, device)?);
        }
        let dtype = self.rec.dtype();
        // Padding steps read an extra zero row.
        let pad = b.slot_items.len() as u32;
        tokens.push(Tensor::zeros((1, w), dtype, device)?);
        let tokens = Tensor::cat(&tokens, 0)?;
        let (mut idx, mut keep) = (vec![pad; rows.len() * steps], vec![0f32; rows.len() * steps]);
        for (i, &r) in rows.iter().enumerate() {
            let start = i * steps + steps - slots_of[r].len();
            for (j, &s) in slots_of[r].iter().enumerate() {
                idx[start + j] = s;
                keep[start + j] = 1.0;
            }
        }
        let n = rows.len();
        let xs = tokens.index_select(&Tensor::from_vec(idx, n * steps, device)?, 0)?.reshape((n, steps, w))?;
        let keep = Tensor::from_vec(keep, (n, steps), device)?.to_dtype(dtype)?;
        Ok(g.last_states(&xs, &keep)?)
    }

    /// Scores of user vectors `u [rows, d]` against item vectors `v [rows, n, d]`: `[rows, n]`.
    fn pair_scores(&self, u: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (u, v) = match self.cfg.similarity {
            Similarity::Dot => (u.clone(), v.clone()),
            Similarity::Cosine => (unit_rows(u)?.affine(1.0 / self.cfg.temperature, 0.0)?, unit_rows(v)?),
        };
        Ok(v.broadcast_mul(&u.unsqueeze(1)?)?.sum(D::Minus1)?)
    }

    /// L_RERI: per feature type, a loss of the target against the sampled negatives under the user
    /// and item heads (`kind`: BCE, the paper's, or a sampled softmax); mean over feature types and
    /// users. `negatives` holds `per_user` items for each row, row-major. A target that lacks the
    /// feature contributes nothing to that type's term; a negative that lacks it is left out.
    pub fn retrieval_loss(
        &self,
        h: &Tensor,
        targets: &[u32],
        negatives: &[u32],
        per_user: usize,
        kind: RetrievalLoss,
        feats: &Features,
    ) -> Result<Tensor> {
        let device = h.device();
        let rows = targets.len();
        if per_user == 0 || negatives.len() != rows * per_user {
            return Err(ModelError::Invalid(format!(
                "{} negatives for {rows} users x {per_user} each",
                negatives.len()
            )));
        }
        let mut total: Option<Tensor> = None;
        for ((kind_f, user), (_, item)) in self.user_heads.iter().zip(&self.item_heads) {
            let f = feature(feats, *kind_f)?;
            let u = user.forward(h)?;
            let side = |items: &[u32], n: usize| -> Result<(Tensor, Tensor)> {
                let idx = Tensor::from_slice(items, items.len(), device)?;
                let v = item.forward(&f.values.index_select(&idx, 0)?)?.reshape((rows, n, ()))?;
                Ok((v, f.present_t.index_select(&idx, 0)?.reshape((rows, n))?))
            };
            let (pos, pos_w) = side(targets, 1)?;
            let (neg, neg_w) = side(negatives, per_user)?;
            let pos_logits = self.pair_scores(&u, &pos)?;
            let neg_logits = self.pair_scores(&u, &neg)?;
            let term = match kind {
                RetrievalLoss::Bce => {
                    let p = bce_with_logits(&pos_logits, 1.0, &pos_w, rows as f64)?;
                    let n = bce_with_logits(&neg_logits, 0.0, &neg_w, (rows * per_user) as f64)?;
                    (p + n.affine(per_user as f64, 0.0)?)?
                }
                RetrievalLoss::Softmax => {
                    // Negatives without the feature are pushed out of the softmax.
                    let masked = (neg_logits + neg_w.affine(1e9, -1e9)?)?;
                    let all = Tensor::cat(&[&pos_logits, &masked], 1)?;
                    let log_p = candle_nn::ops::log_softmax(&all, D::Minus1)?.narrow(1, 0, 1)?;
                    (log_p * &pos_w)?.sum_all()?.affine(-1.0 / rows as f64, 0.0)?
                }
            };
            total = Some(match total {
                None => term,
                Some(t) => (t + term)?,
            });
        }
        let total = total.ok_or_else(|| ModelError::Invalid("no retrieval heads".into()))?;
        Ok(total.affine(1.0 / self.user_heads.len() as f64, 0.0)?)
    }

    /// L_RISA: causal-LM cross-entropy on the answer tokens (and EOS), a mean over rows of per-row
    /// means. The LM head is applied only at the supervised positions.
    pub fn alignment_loss(&self, llm: &Llm, b: &EncodedBatch, feats: &Features) -> Result<Tensor> {
        if self.gru.is_some() {
            return Err(ModelError::Invalid(
                "backbone gru has no language head for L_RISA: set train.illmrec.risa_weight: 0".into(),
            ));
        }
        let device = llm.model.device();
        let hidden = self.hidden(llm, b, feats, Graph::Keep)?;
        let n = b.label_pos.len();
        let at = hidden.index_select(&Tensor::from_slice(&b.label_pos, n, device)?, 0)?;
        let log_probs = candle_nn::ops::log_softmax(&llm.model.logits(&at)?, D::Minus1)?;
        let picked = log_probs.gather(&Tensor::from_slice(&b.label_ids, (n, 1), device)?, 1)?.squeeze(1)?;
        let w = Tensor::from_slice(&b.label_weights, n, device)?.to_dtype(picked.dtype())?;
        Ok((picked * w)?.sum_all()?.neg()?)
    }

    /// Item-side embeddings of every item for each retrieval feature type: `[items + 1, head_dim]`
    /// (unit length under the cosine similarity).
    pub fn item_embeddings(&self, feats: &Features) -> Result<Vec<Tensor>> {
        self.item_heads
            .iter()
            .map(|(k, head)| {
                let e = head.forward(&feature(feats, *k)?.values)?.detach();
                Ok(match self.cfg.similarity {
                    Similarity::Dot => e,
                    Similarity::Cosine => unit_rows(&e)?,
                })
            })
            .collect()
    }

    /// Scores `[rows, items + 1]`: the mean, over the retrieval feature types an item has, of the
    /// similarity of the user's and the item's head outputs.
    pub fn scores(&self, h: &Tensor, item_embs: &[Tensor], feats: &Features) -> Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        let mut count: Option<Tensor> = None;
        for (((kind, user), emb), _) in self.user_heads.iter().zip(item_embs).zip(&self.item_heads) {
            let f = feature(feats, *kind)?;
            let u = user.forward(h)?;
            let u = match self.cfg.similarity {
                Similarity::Dot => u,
                Similarity::Cosine => unit_rows(&u)?.affine(1.0 / self.cfg.temperature, 0.0)?,
            };
            let s = u.matmul(&emb.t()?)?.broadcast_mul(&f.present_t.unsqueeze(0)?)?;
            sum = Some(match sum {
                None => s,
                Some(t) => (t + s)?,
            });
            count = Some(match count {
                None => f.present_t.clone(),
                Some(c) => (c + &f.present_t)?,
            });
        }
        let (sum, count) = sum.zip(count).ok_or_else(|| ModelError::Invalid("no retrieval heads".into()))?;
        Ok(sum.broadcast_div(&count.clamp(1.0, f64::MAX)?.unsqueeze(0)?)?)
    }

    pub fn to_host(&self) -> Result<Vec<HostTensor>> {
        super::vars_to_host(&self.vars)
    }

    pub fn load_host(&self, tensors: &[HostTensor]) -> Result<()> {
        super::load_host_into(&self.vars, tensors)
    }
}

/// Rows scaled to unit length (rows of zeros stay zero).
fn unit_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.affine(1.0, 1e-12)?.sqrt()?;
    x.broadcast_div(&norm)
}

fn feature(feats: &Features, kind: FeatureKind) -> Result<&FeatureMatrix> {
    feats.get(&kind).ok_or_else(|| ModelError::Invalid(format!("no {kind} features are loaded")))
}

impl FeatureMatrix {
    /// Feature dimensions of a feature set, for `IllmRec::new`.
    pub fn dims(feats: &Features) -> BTreeMap<FeatureKind, usize> {
        feats.iter().map(|(k, f)| (*k, f.dim())).collect()
    }
}

#[cfg(test)]
mod tests;
