//! FREEDOM (Zhou & Shen, 2023): a frozen item-item graph mixed from each modality's top-k cosine
//! kNN graph propagates the item ids; a LightGCN over the user-item graph, pruned afresh each epoch by
//! degree-sensitive edge dropout, gives the user and item representations; the loss is BPR plus
//! `reg` times a BPR of each modality's projected features.
//!
//! Item vector = LightGCN item + (item-item graph)^mm_layers · item id; user vector = LightGCN user.
//! The raw features stay frozen (the authors' code also fine-tunes them; the graphs it builds from
//! them are frozen either way).

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::adjacency::{edge_weights, knn_graph, normalized_bipartite, sample_edges};
use super::lightgcn::propagate;
use super::sparse::{Csr, SparseMatrix};
use super::{bpr, feature_tensor, Batch, GraphModel, Interactions};
use crate::data::FeatureKind;
use crate::invalid::Invalid;
use crate::model::layers::{const_var, normal_var};
use crate::model::Result;
use crate::seed::Rng;

/// Defaults: the authors' settings (MMRec) as MSRBench ran them; see docs/msrbench-method.md.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FreedomConfig {
    #[serde(default = "d_dim")]
    pub dim: usize,
    /// Neighbours per item in each modality's kNN graph.
    #[serde(default = "d_knn")]
    pub knn_k: usize,
    /// Propagations over the item-item graph.
    #[serde(default = "d_one")]
    pub mm_layers: usize,
    /// LightGCN layers over the user-item graph.
    #[serde(default = "d_two")]
    pub ui_layers: usize,
    /// Weight of the image graph in the mix (text: 1 - this) when both modalities are there.
    #[serde(default = "d_image_weight")]
    pub image_weight: f32,
    /// Share of user-item edges pruned each epoch.
    #[serde(default = "d_dropout")]
    pub dropout: f64,
    /// Weight of the feature-projection BPR.
    #[serde(default = "d_reg")]
    pub reg: f64,
}

fn d_dim() -> usize {
    64
}
fn d_knn() -> usize {
    10
}
fn d_one() -> usize {
    1
}
fn d_two() -> usize {
    2
}
fn d_image_weight() -> f32 {
    0.1
}
fn d_dropout() -> f64 {
    0.9
}
fn d_reg() -> f64 {
    1e-4
}

impl Default for FreedomConfig {
    fn default() -> Self {
        Self {
            dim: d_dim(),
            knn_k: d_knn(),
            mm_layers: d_one(),
            ui_layers: d_two(),
            image_weight: d_image_weight(),
            dropout: d_dropout(),
            reg: d_reg(),
        }
    }
}

impl FreedomConfig {
    pub fn validate(&self) -> std::result::Result<(), Invalid> {
        if self.dim == 0 || self.knn_k == 0 {
            return Err(Invalid::new("dim", "dim and knn_k must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Invalid::new("dropout", "must be in [0, 1)"));
        }
        if !(0.0..=1.0).contains(&self.image_weight) || self.reg < 0.0 {
            return Err(Invalid::new("image_weight", "image_weight must be in [0, 1] and reg not negative"));
        }
        Ok(())
    }
}

/// One modality's frozen features [N, d] and its trained projection to `dim`.
struct Modality {
    features: Tensor,
    w: usize,
    b: usize,
}

pub struct Freedom {
    cfg: FreedomConfig,
    graph: Interactions,
    vars: Vec<(String, Var)>,
    modalities: Vec<Modality>,
    item_item: SparseMatrix,
    full: SparseMatrix,
    /// This epoch's pruned user-item graph.
    pruned: SparseMatrix,
    weights: Vec<f32>,
}

/// The item-item graph: each modality's kNN graph, image and text mixed by `image_weight`.
pub fn item_graph(cfg: &FreedomConfig, modalities: &[(FeatureKind, usize, &[f32])], items: usize) -> Result<Csr> {
    let mut graphs = Vec::new();
    for &(kind, dim, values) in modalities {
        graphs.push((kind, knn_graph(values, items, dim, cfg.knn_k)?));
    }
    Ok(match graphs.as_slice() {
        [(_, g)] => g.clone(),
        [(a, ga), (_, gb)] => {
            let (image, text) = if *a == FeatureKind::Image { (ga, gb) } else { (gb, ga) };
            image.mix(cfg.image_weight, text, 1.0 - cfg.image_weight)
        }
        _ => return Err(crate::model::ModelError::Invalid("FREEDOM mixes one or two modalities".into())),
    })
}

impl Freedom {
    /// `modalities`: (kind, dim, [N * dim] values of items 1..=N).
    pub fn new(
        cfg: FreedomConfig,
        graph: Interactions,
        modalities: &[(FeatureKind, usize, &[f32])],
        rng: &mut Rng,
    ) -> Result<Self> {
        let dev = Device::Cpu;
        let d = cfg.dim;
        // Xavier-uniform-like scale for the id tables, as MMRec initialises them.
        let std = |rows: usize| (2.0 / (rows + d) as f64).sqrt();
        let mut vars = vec![
            ("user_emb".to_string(), normal_var((graph.users, d), std(graph.users), rng, &dev)?),
            ("item_emb".to_string(), normal_var((graph.items, d), std(graph.items), rng, &dev)?),
        ];
        let mut mods = Vec::new();
        for &(kind, dim, values) in modalities {
            vars.push((format!("{kind}_trs.w"), normal_var((dim, d), std(dim), rng, &dev)?));
            vars.push((format!("{kind}_trs.b"), const_var(d, 0.0, &dev)?));
            mods.push(Modality { features: feature_tensor(values, dim)?, w: vars.len() - 2, b: vars.len() - 1 });
        }
        let item_item = SparseMatrix::new(item_graph(&cfg, modalities, graph.items)?);
        let full = SparseMatrix::new(normalized_bipartite(graph.users, graph.items, &graph.edges));
        let weights = edge_weights(graph.users, graph.items, &graph.edges);
        Ok(Self { cfg, pruned: full.clone(), full, item_item, graph, vars, modalities: mods, weights })
    }

    fn t(&self, i: usize) -> &Tensor {
        self.vars[i].1.as_tensor()
    }

    fn forward(&self, adj: &SparseMatrix) -> candle_core::Result<(Tensor, Tensor)> {
        let mut h = self.t(1).clone();
        for _ in 0..self.cfg.mm_layers {
            h = self.item_item.matmul(&h)?;
        }
        let ego = Tensor::cat(&[self.t(0), self.t(1)], 0)?;
        let all = propagate(adj, &ego, self.cfg.ui_layers)?;
        let users = all.narrow(0, 0, self.graph.users)?;
        let items = (all.narrow(0, self.graph.users, self.graph.items)? + h)?;
        Ok((users, items))
    }
}

impl GraphModel for Freedom {
    fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    fn start_epoch(&mut self, rng: &mut Rng) -> Result<()> {
        if self.cfg.dropout > 0.0 {
            let keep = ((self.graph.edges.len() as f64) * (1.0 - self.cfg.dropout)) as usize;
            let kept = sample_edges(&self.graph.edges, &self.weights, keep, rng);
            self.pruned = SparseMatrix::new(normalized_bipartite(self.graph.users, self.graph.items, &kept));
        }
        Ok(())
    }

    fn loss(&self, batch: &Batch, _rng: &mut Rng) -> Result<Tensor> {
        let (users, pos, neg) = batch.tensors()?;
        let (u, i) = self.forward(&self.pruned)?;
        let u = u.index_select(&users, 0)?;
        let mut loss = bpr(&u, &i.index_select(&pos, 0)?, &i.index_select(&neg, 0)?)?;
        for m in &self.modalities {
            let project = |rows: &Tensor| {
                crate::model::layers::linear(&m.features.index_select(rows, 0)?, self.t(m.w), self.t(m.b))
            };
            let feature_bpr = bpr(&u, &project(&pos)?, &project(&neg)?)?;
            loss = (loss + feature_bpr.affine(self.cfg.reg, 0.0)?)?;
        }
        Ok(loss)
    }

    fn embeddings(&self) -> Result<(Tensor, Tensor)> {
        Ok(self.forward(&self.full)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prunes_each_epoch_learns_everywhere_and_scores_an_isolated_user() {
        // User 2 has no training interaction: an isolated node.
        let graph = Interactions::new(4, [&[1u32, 2][..], &[2, 3, 4][..], &[][..], &[1, 4][..]]);
        let text: Vec<f32> = (0..4 * 3).map(|v| (v % 5) as f32 - 2.0).collect();
        let image: Vec<f32> = (0..4 * 2).map(|v| (v % 3) as f32 - 1.0).collect();
        let cfg = FreedomConfig { dim: 4, knn_k: 2, dropout: 0.5, reg: 0.1, ..Default::default() };
        let mods = [(FeatureKind::Image, 2, &image[..]), (FeatureKind::Text, 3, &text[..])];
        let mut m = Freedom::new(cfg, graph, &mods, &mut crate::seed::stream(1, "t", 0)).unwrap();
        assert_eq!(m.item_item.csr().rows, 4);
        m.start_epoch(&mut crate::seed::stream(1, "e", 1)).unwrap();
        // 7 edges, half dropped: 3 kept, each in both directions.
        assert_eq!(m.pruned.csr().nnz(), 6);
        assert_eq!(m.full.csr().nnz(), 14);
        let batch = Batch { users: vec![0, 1, 3], positives: vec![0, 2, 3], negatives: vec![3, 0, 1] };
        let loss = m.loss(&batch, &mut crate::seed::stream(1, "d", 0)).unwrap();
        let grads = loss.backward().unwrap();
        for (name, v) in m.vars() {
            assert!(grads.get(v.as_tensor()).is_some(), "no gradient for {name}");
        }
        let (u, i) = m.embeddings().unwrap();
        assert_eq!((u.dims(), i.dims()), (&[4usize, 4][..], &[4usize, 4][..]));
        let s = crate::model::graph::GraphScorer::new(&m, crate::model::graph::GraphKind::Freedom).unwrap();
        use crate::model::Scorer;
        assert!(s.score_users(&[2], &[&[]]).unwrap().iter().all(|v| v.is_finite()));
    }
}
