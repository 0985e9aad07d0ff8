//! BM3 (Zhou et al., 2023): bootstrapped multimodal learning without negative samples. A LightGCN
//! gives online user and item vectors; a shared predictor maps online vectors (and each modality's
//! projected features) into the space of target views made by dropout from the online vectors with
//! the gradient stopped. The loss aligns user to target item and item to target user by cosine,
//! aligns each modality's features with the target item and with their own target view, and adds
//! `reg` times the embeddings' norms. Scores are dot products of predicted users and items.

use candle_core::{Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use super::adjacency::normalized_bipartite;
use super::lightgcn::propagate;
use super::sparse::SparseMatrix;
use super::{feature_tensor, Batch, GraphModel, Interactions};
use crate::data::FeatureKind;
use crate::invalid::Invalid;
use crate::model::layers::{const_var, dropout, linear, normal_var};
use crate::model::Result;
use crate::seed::Rng;

/// Defaults: MSRBench's BM3 settings (one GCN layer, reg 0.01, dropout 0.3) and the authors'
/// contrastive weight.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Bm3Config {
    #[serde(default = "d_dim")]
    pub dim: usize,
    #[serde(default = "d_layers")]
    pub layers: usize,
    /// Dropout that makes the target views.
    #[serde(default = "d_dropout")]
    pub dropout: f64,
    #[serde(default = "d_reg")]
    pub reg: f64,
    /// Weight of the feature alignment losses.
    #[serde(default = "d_cl")]
    pub cl_weight: f64,
}

fn d_dim() -> usize {
    64
}
fn d_layers() -> usize {
    1
}
fn d_dropout() -> f64 {
    0.3
}
fn d_reg() -> f64 {
    0.01
}
fn d_cl() -> f64 {
    2.0
}

impl Default for Bm3Config {
    fn default() -> Self {
        Self { dim: d_dim(), layers: d_layers(), dropout: d_dropout(), reg: d_reg(), cl_weight: d_cl() }
    }
}

impl Bm3Config {
    pub fn validate(&self) -> std::result::Result<(), Invalid> {
        if self.dim == 0 {
            return Err(Invalid::new("dim", "must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Invalid::new("dropout", "must be in [0, 1)"));
        }
        if self.reg < 0.0 || self.cl_weight < 0.0 {
            return Err(Invalid::new("reg", "reg and cl_weight must not be negative"));
        }
        Ok(())
    }
}

/// 1 - mean cosine similarity of the rows of `a` and `b`.
pub fn cosine_gap(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let dot = (a * b)?.sum(D::Minus1)?;
    let norms = (a.sqr()?.sum(D::Minus1)?.sqrt()? * b.sqr()?.sum(D::Minus1)?.sqrt()?)?.clamp(1e-8, f64::MAX)?;
    (dot / norms)?.mean_all()?.affine(-1.0, 1.0)
}

/// BM3's objective from its parts: the online predictions of the batch's users and items, their
/// target views, each modality's (online prediction, target view) for the batch's items, and the
/// embedding norm term.
pub struct Parts {
    pub user_online: Tensor,
    pub item_online: Tensor,
    pub user_target: Tensor,
    pub item_target: Tensor,
    pub modalities: Vec<(Tensor, Tensor)>,
    pub norm: Tensor,
}

/// L = gap(u, i') + gap(i, u') + reg * norm + cl * sum over modalities (gap(f, i') + gap(f, f')),
/// with gap = 1 - mean cosine and ' the (gradient-stopped) target views.
pub fn objective(p: &Parts, reg: f64, cl_weight: f64) -> candle_core::Result<Tensor> {
    let (ut, it) = (p.user_target.detach(), p.item_target.detach());
    let mut loss = (cosine_gap(&p.user_online, &it)? + cosine_gap(&p.item_online, &ut)?)?;
    loss = (loss + p.norm.affine(reg, 0.0)?)?;
    for (online, target) in &p.modalities {
        let align = (cosine_gap(online, &it)? + cosine_gap(online, &target.detach())?)?;
        loss = (loss + align.affine(cl_weight, 0.0)?)?;
    }
    Ok(loss)
}

struct Modality {
    features: Tensor,
    w: usize,
    b: usize,
}

pub struct Bm3 {
    cfg: Bm3Config,
    graph: Interactions,
    adj: SparseMatrix,
    vars: Vec<(String, Var)>,
    modalities: Vec<Modality>,
}

const USER: usize = 0;
const ITEM: usize = 1;
const PRED_W: usize = 2;
const PRED_B: usize = 3;

impl Bm3 {
    /// `modalities`: (kind, dim, [N * dim] values of items 1..=N).
    pub fn new(
        cfg: Bm3Config,
        graph: Interactions,
        modalities: &[(FeatureKind, usize, &[f32])],
        rng: &mut Rng,
    ) -> Result<Self> {
        let dev = Device::Cpu;
        let d = cfg.dim;
        let std = |rows: usize, cols: usize| (2.0 / (rows + cols) as f64).sqrt();
        let mut vars = vec![
            ("user_emb".to_string(), normal_var((graph.users, d), std(graph.users, d), rng, &dev)?),
            ("item_emb".to_string(), normal_var((graph.items, d), std(graph.items, d), rng, &dev)?),
            ("predictor.w".to_string(), normal_var((d, d), std(d, d), rng, &dev)?),
            ("predictor.b".to_string(), const_var(d, 0.0, &dev)?),
        ];
        let mut mods = Vec::new();
        for &(kind, dim, values) in modalities {
            vars.push((format!("{kind}_trs.w"), normal_var((dim, d), std(dim, d), rng, &dev)?));
            vars.push((format!("{kind}_trs.b"), const_var(d, 0.0, &dev)?));
            mods.push(Modality { features: feature_tensor(values, dim)?, w: vars.len() - 2, b: vars.len() - 1 });
        }
        let adj = SparseMatrix::new(normalized_bipartite(graph.users, graph.items, &graph.edges));
        Ok(Self { cfg, graph, adj, vars, modalities: mods })
    }

    fn t(&self, i: usize) -> &Tensor {
        self.vars[i].1.as_tensor()
    }

    /// LightGCN users and items; items add their id embedding, as the authors' code does.
    fn online(&self) -> candle_core::Result<(Tensor, Tensor)> {
        let ego = Tensor::cat(&[self.t(USER), self.t(ITEM)], 0)?;
        let all = propagate(&self.adj, &ego, self.cfg.layers)?;
        let users = all.narrow(0, 0, self.graph.users)?;
        let items = (all.narrow(0, self.graph.users, self.graph.items)? + self.t(ITEM))?;
        Ok((users, items))
    }

    fn predict(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        linear(x, self.t(PRED_W), self.t(PRED_B))
    }
}

impl GraphModel for Bm3 {
    fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    fn needs_negatives(&self) -> bool {
        false
    }

    fn loss(&self, batch: &Batch, rng: &mut Rng) -> Result<Tensor> {
        let (users, items, _) = batch.tensors()?;
        let (u_all, i_all) = self.online()?;
        let (u, i) = (u_all.index_select(&users, 0)?, i_all.index_select(&items, 0)?);
        let p = self.cfg.dropout;
        let mut modalities = Vec::new();
        for m in &self.modalities {
            let f = linear(&m.features.index_select(&items, 0)?, self.t(m.w), self.t(m.b))?;
            let target = dropout(&f.detach(), p, Some(&mut *rng))?;
            modalities.push((self.predict(&f)?, target));
        }
        // MMRec's EmbLoss: the L2 norms of the whole online tables over the item count.
        let norm = ((u_all.sqr()?.sum_all()?.sqrt()? + i_all.sqr()?.sum_all()?.sqrt()?)?
            .affine(1.0 / self.graph.items as f64, 0.0))?;
        let parts = Parts {
            user_online: self.predict(&u)?,
            item_online: self.predict(&i)?,
            user_target: dropout(&u.detach(), p, Some(&mut *rng))?,
            item_target: dropout(&i.detach(), p, Some(&mut *rng))?,
            modalities,
            norm,
        };
        Ok(objective(&parts, self.cfg.reg, self.cfg.cl_weight)?)
    }

    fn embeddings(&self) -> Result<(Tensor, Tensor)> {
        let (u, i) = self.online()?;
        Ok((self.predict(&u)?, self.predict(&i)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rows: &[[f32; 2]; 2]) -> Tensor {
        Tensor::new(rows, &Device::Cpu).unwrap()
    }

    #[test]
    fn objective_on_fixed_tensors_by_hand() {
        let s = 0.5f32.sqrt();
        // Users (1,0),(0,1) vs target items (1,1),(0,1): cosines s and 1.
        // Items (1,0),(1,0) vs target users (1,0),(-1,0): cosines 1 and -1.
        // One modality: (0,1),(2,0) vs target items: s, 0; vs its own targets (0,3),(1,1): 1, s.
        let parts = Parts {
            user_online: t(&[[1., 0.], [0., 1.]]),
            item_online: t(&[[1., 0.], [1., 0.]]),
            user_target: t(&[[1., 0.], [-1., 0.]]),
            item_target: t(&[[1., 1.], [0., 1.]]),
            modalities: vec![(t(&[[0., 1.], [2., 0.]]), t(&[[0., 3.], [1., 1.]]))],
            norm: Tensor::new(3f32, &Device::Cpu).unwrap(),
        };
        let ui = 1.0 - (s + 1.0) / 2.0;
        let iu = 1.0 - (1.0 - 1.0) / 2.0;
        let fi = 1.0 - (s + 0.0) / 2.0;
        let ff = 1.0 - (1.0 + s) / 2.0;
        let want = ui + iu + 0.01 * 3.0 + 2.0 * (fi + ff);
        let got = objective(&parts, 0.01, 2.0).unwrap().to_scalar::<f32>().unwrap();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn targets_carry_no_gradient_and_every_parameter_learns() {
        let graph = Interactions::new(4, [&[1u32, 2][..], &[2, 3][..], &[4][..]]);
        let text: Vec<f32> = (0..4 * 3).map(|v| (v % 5) as f32 - 2.0).collect();
        let cfg = Bm3Config { dim: 4, ..Default::default() };
        let m = Bm3::new(cfg, graph, &[(FeatureKind::Text, 3, &text)], &mut crate::seed::stream(1, "t", 0)).unwrap();
        let batch = Batch { users: vec![0, 1, 2], positives: vec![0, 2, 3], negatives: vec![] };
        let loss = m.loss(&batch, &mut crate::seed::stream(1, "d", 0)).unwrap();
        assert!(loss.to_scalar::<f32>().unwrap().is_finite());
        let grads = loss.backward().unwrap();
        for (name, v) in m.vars() {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
            assert!(g.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().any(|&x| x != 0.0), "{name}");
        }
        let (u, i) = m.embeddings().unwrap();
        assert_eq!((u.dims(), i.dims()), (&[3usize, 4][..], &[4usize, 4][..]));
    }
}
