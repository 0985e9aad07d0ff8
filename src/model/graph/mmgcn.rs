//! MMGCN (Wei et al., 2019) as the MMRec toolkit runs it: one graph convolutional network per
//! modality over the user-item graph, each with its own user preference vectors in that modality's
//! feature space; the node representations of the modalities are averaged and a user scores an item
//! by their dot product. BPR loss plus `reg` times the squared id embeddings of the batch and the
//! preference tables.
//!
//! A layer of one modality's network, over node features x (users' preferences, items' features):
//! h = leaky(mean over neighbours of x W), x̂ = leaky(x V + c) + id, x' = leaky([h, x̂] G + g).
//! The image features first pass a linear layer to `latent` dimensions (the text ones do not).

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::adjacency::mean_bipartite;
use super::sparse::SparseMatrix;
use super::{bpr, feature_tensor, leaky_relu, normalize_rows, Batch, GraphModel, Interactions};
use crate::data::FeatureKind;
use crate::invalid::Invalid;
use crate::model::layers::{const_var, linear, normal_var};
use crate::model::Result;
use crate::seed::Rng;

/// Defaults: MMRec's settings, reg as MSRBench ran it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MmgcnConfig {
    #[serde(default = "d_dim")]
    pub dim: usize,
    /// Width the image features are first projected to.
    #[serde(default = "d_latent")]
    pub latent: usize,
    #[serde(default = "d_layers")]
    pub layers: usize,
    #[serde(default = "d_reg")]
    pub reg: f64,
}

fn d_dim() -> usize {
    64
}
fn d_latent() -> usize {
    256
}
fn d_layers() -> usize {
    3
}
fn d_reg() -> f64 {
    0.1
}

impl Default for MmgcnConfig {
    fn default() -> Self {
        Self { dim: d_dim(), latent: d_latent(), layers: d_layers(), reg: d_reg() }
    }
}

impl MmgcnConfig {
    pub fn validate(&self) -> std::result::Result<(), Invalid> {
        if self.dim == 0 || self.latent == 0 || self.layers == 0 {
            return Err(Invalid::new("dim", "dim, latent and layers must be at least 1"));
        }
        if self.reg < 0.0 {
            return Err(Invalid::new("reg", "must not be negative"));
        }
        Ok(())
    }
}

/// One modality's network: indices into `vars`.
struct Gcn {
    features: Tensor,
    /// The image projection (weight, bias).
    mlp: Option<(usize, usize)>,
    preference: usize,
    /// Per layer: conv W, (V, c), (G, g).
    layers: Vec<[usize; 5]>,
}

pub struct Mmgcn {
    cfg: MmgcnConfig,
    graph: Interactions,
    adj: SparseMatrix,
    vars: Vec<(String, Var)>,
    gcns: Vec<Gcn>,
}

const ID: usize = 0;

/// Appends a variable; its index.
fn push(vars: &mut Vec<(String, Var)>, name: String, v: Var) -> usize {
    vars.push((name, v));
    vars.len() - 1
}

impl Mmgcn {
    /// `modalities`: (kind, dim, [N * dim] values of items 1..=N).
    pub fn new(
        cfg: MmgcnConfig,
        graph: Interactions,
        modalities: &[(FeatureKind, usize, &[f32])],
        rng: &mut Rng,
    ) -> Result<Self> {
        let dev = Device::Cpu;
        let d = cfg.dim;
        let nodes = graph.users + graph.items;
        let xavier = |rows: usize, cols: usize, rng: &mut Rng| {
            normal_var((rows, cols), (2.0 / (rows + cols) as f64).sqrt(), rng, &dev)
        };
        let mut vars = vec![("id_emb".to_string(), xavier(nodes, d, rng)?)];
        let mut gcns = Vec::new();
        for &(kind, dim, values) in modalities {
            let (mlp, width) = if kind == FeatureKind::Image {
                let w = push(&mut vars, format!("{kind}.mlp.w"), xavier(dim, cfg.latent, rng)?);
                let b = push(&mut vars, format!("{kind}.mlp.b"), const_var(cfg.latent, 0.0, &dev)?);
                (Some((w, b)), cfg.latent)
            } else {
                (None, dim)
            };
            let preference = push(&mut vars, format!("{kind}.preference"), xavier(graph.users, width, rng)?);
            let mut layers = Vec::new();
            for l in 0..cfg.layers {
                let c = if l == 0 { width } else { d };
                layers.push([
                    push(&mut vars, format!("{kind}.conv{l}.w"), xavier(c, c, rng)?),
                    push(&mut vars, format!("{kind}.lin{l}.w"), xavier(c, d, rng)?),
                    push(&mut vars, format!("{kind}.lin{l}.b"), const_var(d, 0.0, &dev)?),
                    push(&mut vars, format!("{kind}.g{l}.w"), xavier(c + d, d, rng)?),
                    push(&mut vars, format!("{kind}.g{l}.b"), const_var(d, 0.0, &dev)?),
                ]);
            }
            gcns.push(Gcn { features: feature_tensor(values, dim)?, mlp, preference, layers });
        }
        let adj = SparseMatrix::new(mean_bipartite(graph.users, graph.items, &graph.edges));
        Ok(Self { cfg, graph, adj, vars, gcns })
    }

    fn t(&self, i: usize) -> &Tensor {
        self.vars[i].1.as_tensor()
    }

    fn network(&self, g: &Gcn) -> candle_core::Result<Tensor> {
        let items = match g.mlp {
            Some((w, b)) => linear(&g.features, self.t(w), self.t(b))?,
            None => g.features.clone(),
        };
        let mut x = normalize_rows(&Tensor::cat(&[self.t(g.preference), &items], 0)?)?;
        for &[conv, v, c, gw, gb] in &g.layers {
            let h = leaky_relu(&self.adj.matmul(&x.matmul(self.t(conv))?)?)?;
            let x_hat = (leaky_relu(&linear(&x, self.t(v), self.t(c))?)? + self.t(ID))?;
            x = leaky_relu(&linear(&Tensor::cat(&[&h, &x_hat], 1)?, self.t(gw), self.t(gb))?)?;
        }
        Ok(x)
    }

    /// The modalities' node representations averaged: [U + N, dim].
    fn representation(&self) -> candle_core::Result<Tensor> {
        let mut sum = self.network(&self.gcns[0])?;
        for g in &self.gcns[1..] {
            sum = (sum + self.network(g)?)?;
        }
        sum.affine(1.0 / self.gcns.len() as f64, 0.0)
    }
}

impl GraphModel for Mmgcn {
    fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    fn loss(&self, batch: &Batch, _rng: &mut Rng) -> Result<Tensor> {
        // Item rows sit after the users in the node tables.
        let nodes = |rows: &[u32]| {
            let ids: Vec<u32> = rows.iter().map(|&i| i + self.graph.users as u32).collect();
            Tensor::from_vec(ids, rows.len(), &Device::Cpu)
        };
        let users = Tensor::from_slice(&batch.users, batch.users.len(), &Device::Cpu)?;
        let (pos, neg) = (nodes(&batch.positives)?, nodes(&batch.negatives)?);
        let rep = self.representation()?;
        let loss = bpr(&rep.index_select(&users, 0)?, &rep.index_select(&pos, 0)?, &rep.index_select(&neg, 0)?)?;
        let id = self.t(ID);
        let sq = |rows: &Tensor| id.index_select(rows, 0)?.sqr()?.mean_all();
        // MMRec's mean of (id[user]² + id[item]²) over the batch's (user, pos) and (user, neg) pairs.
        let mut reg = (sq(&users)? + ((sq(&pos)? + sq(&neg)?)?.affine(0.5, 0.0))?)?;
        for g in &self.gcns {
            reg = (reg + self.t(g.preference).sqr()?.mean_all()?)?;
        }
        Ok((loss + reg.affine(self.cfg.reg, 0.0)?)?)
    }

    fn embeddings(&self) -> Result<(Tensor, Tensor)> {
        let rep = self.representation()?;
        Ok((rep.narrow(0, 0, self.graph.users)?, rep.narrow(0, self.graph.users, self.graph.items)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_network_per_modality_and_every_parameter_learns() {
        let graph = Interactions::new(4, [&[1u32, 2][..], &[2, 3][..], &[4][..]]);
        let text: Vec<f32> = (0..4 * 3).map(|v| (v % 5) as f32 - 2.0).collect();
        let image: Vec<f32> = (0..4 * 2).map(|v| (v % 3) as f32 - 1.0).collect();
        let cfg = MmgcnConfig { dim: 4, latent: 5, layers: 2, reg: 0.1 };
        let mods = [(FeatureKind::Text, 3, &text[..]), (FeatureKind::Image, 2, &image[..])];
        let m = Mmgcn::new(cfg, graph, &mods, &mut crate::seed::stream(1, "t", 0)).unwrap();
        let shape = |name: &str| m.vars().iter().find(|(n, _)| n == name).unwrap().1.dims().to_vec();
        assert_eq!(shape("text.preference"), vec![3, 3]);
        assert_eq!(shape("image.preference"), vec![3, 5]);
        assert_eq!(shape("image.g0.w"), vec![5 + 4, 4]);
        let batch = Batch { users: vec![0, 1, 2], positives: vec![0, 2, 3], negatives: vec![3, 0, 1] };
        let loss = m.loss(&batch, &mut crate::seed::stream(1, "d", 0)).unwrap();
        let grads = loss.backward().unwrap();
        for (name, v) in m.vars() {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
            assert!(g.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite()), "{name}");
        }
        let (u, i) = m.embeddings().unwrap();
        assert_eq!((u.dims(), i.dims()), (&[3usize, 4][..], &[4usize, 4][..]));
    }
}
