//! Graph-based multimodal collaborative filtering, as the MMRec toolkit runs it: FREEDOM, BM3 and
//! MMGCN. Each learns one vector per user and per item over the user-item graph of the training
//! split (with frozen item features), and scores an item by a dot product. They train in one process.

pub mod adjacency;
pub mod bm3;
pub mod freedom;
pub mod lightgcn;
pub mod mmgcn;
pub mod sparse;

use candle_core::{Device, Tensor, Var, D};

use super::{ModelError, Result, Scorer};
use crate::seed::Rng;

/// The graph models `--model` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphKind {
    Freedom,
    Bm3,
    Mmgcn,
}

impl GraphKind {
    pub fn name(self) -> &'static str {
        match self {
            GraphKind::Freedom => "freedom",
            GraphKind::Bm3 => "bm3",
            GraphKind::Mmgcn => "mmgcn",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [GraphKind::Freedom, GraphKind::Bm3, GraphKind::Mmgcn].into_iter().find(|k| k.name() == s)
    }
}

/// The training interactions as a graph: distinct (user, item row) edges, item row r = item r + 1.
#[derive(Debug, Clone, PartialEq)]
pub struct Interactions {
    pub users: usize,
    pub items: usize,
    pub edges: Vec<(u32, u32)>,
    /// Each user's item rows, sorted (negative sampling skips them).
    pub by_user: Vec<Vec<u32>>,
}

impl Interactions {
    /// From each user's training items (1-based item indices).
    pub fn new<'a>(items: usize, train: impl IntoIterator<Item = &'a [u32]>) -> Self {
        let mut by_user: Vec<Vec<u32>> = train
            .into_iter()
            .map(|seq| {
                let mut rows: Vec<u32> = seq.iter().map(|&i| i - 1).collect();
                rows.sort_unstable();
                rows.dedup();
                rows
            })
            .collect();
        by_user.shrink_to_fit();
        let edges = by_user.iter().enumerate().flat_map(|(u, rows)| rows.iter().map(move |&i| (u as u32, i))).collect();
        Self { users: by_user.len(), items, edges, by_user }
    }
}

/// One training batch: interactions (users[k], positives[k]) and, for the BPR models, one item row
/// each that the user never interacted with.
#[derive(Debug, Clone)]
pub struct Batch {
    pub users: Vec<u32>,
    pub positives: Vec<u32>,
    pub negatives: Vec<u32>,
}

impl Batch {
    pub fn tensors(&self) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let t = |v: &[u32]| Tensor::from_slice(v, v.len(), &Device::Cpu);
        Ok((t(&self.users)?, t(&self.positives)?, t(&self.negatives)?))
    }
}

/// What the graph trainer needs of a model.
pub trait GraphModel {
    /// Every trainable tensor, in a fixed order; names are the checkpoint's tensor names.
    fn vars(&self) -> &[(String, Var)];
    /// Whether the loss needs sampled negatives (BM3 does not).
    fn needs_negatives(&self) -> bool {
        true
    }
    /// Before each epoch (FREEDOM redraws its pruned user-item graph here).
    fn start_epoch(&mut self, _rng: &mut Rng) -> Result<()> {
        Ok(())
    }
    /// The training loss of one batch; `rng` draws any dropout.
    fn loss(&self, batch: &Batch, rng: &mut Rng) -> Result<Tensor>;
    /// The user [U, d] and item [N, d] representations whose dot products score items.
    fn embeddings(&self) -> Result<(Tensor, Tensor)>;
}

/// A trained graph model as evaluation sees it: fixed user and item vectors.
pub struct GraphScorer {
    users: Tensor,
    items_t: Tensor,
    name: &'static str,
}

impl GraphScorer {
    pub fn new(model: &dyn GraphModel, kind: GraphKind) -> Result<Self> {
        let (users, items) = model.embeddings()?;
        Ok(Self { users, items_t: items.t()?.contiguous()?, name: kind.name() })
    }
}

impl Scorer for GraphScorer {
    fn score(&self, _histories: &[&[u32]]) -> Result<Vec<f32>> {
        Err(ModelError::Invalid(format!(
            "{} learns one vector per user of its training snapshot: it scores those users, not a bare history",
            self.name
        )))
    }

    fn score_users(&self, users: &[usize], _histories: &[&[u32]]) -> Result<Vec<f32>> {
        let known = self.users.dim(0)?;
        if let Some(u) = users.iter().find(|&&u| u >= known) {
            return Err(ModelError::Invalid(format!(
                "{}: user {u} is not among the {known} it was trained on",
                self.name
            )));
        }
        let ids = Tensor::from_vec(users.iter().map(|&u| u as u32).collect::<Vec<_>>(), users.len(), &Device::Cpu)?;
        let scores = self.users.index_select(&ids, 0)?.matmul(&self.items_t)?;
        // Column 0 is the padding item.
        let padded = Tensor::cat(&[&scores.narrow(1, 0, 1)?.zeros_like()?, &scores], 1)?;
        Ok(padded.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// log σ(x), stable for any x: -(relu(-x) + log(1 + exp(-|x|))).
pub fn log_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    let soft = x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    (x.neg()?.relu()? + soft)?.neg()
}

/// BPR: -mean log σ(<u, p> - <u, n>) over the rows of u, p, n [b, d].
pub fn bpr(u: &Tensor, p: &Tensor, n: &Tensor) -> candle_core::Result<Tensor> {
    let diff = ((u * p)?.sum(D::Minus1)? - (u * n)?.sum(D::Minus1)?)?;
    log_sigmoid(&diff)?.mean_all()?.neg()
}

/// LeakyReLU with slope 0.01 (PyTorch's default), from primitives so it has a backward.
pub fn leaky_relu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.relu()? - x.neg()?.relu()?.affine(0.01, 0.0)?
}

/// Each row scaled to unit L2 norm (rows of zeros stay zero).
pub fn normalize_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?)
}

/// The rows of a frozen [N, d] feature matrix given as a host slice.
pub fn feature_tensor(values: &[f32], dim: usize) -> candle_core::Result<Tensor> {
    Tensor::from_slice(values, (values.len() / dim.max(1), dim), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpr_and_log_sigmoid_match_the_formulas() {
        let dev = Device::Cpu;
        let u = Tensor::new(&[[1f32, 0.0], [0.0, 2.0]], &dev).unwrap();
        let p = Tensor::new(&[[3f32, 0.0], [0.0, 1.0]], &dev).unwrap();
        let n = Tensor::new(&[[1f32, 5.0], [0.0, 3.0]], &dev).unwrap();
        // Differences 3 - 1 = 2 and 2 - 6 = -4.
        let want = -((1.0 / (1.0 + (-2f32).exp())).ln() + (1.0 / (1.0 + 4f32.exp())).ln()) / 2.0;
        let got = bpr(&u, &p, &n).unwrap().to_scalar::<f32>().unwrap();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        let big = log_sigmoid(&Tensor::new(&[-200f32, 200.0], &dev).unwrap()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(big, vec![-200.0, 0.0]);
    }

    #[test]
    fn interactions_deduplicate_and_scorer_pads_item_zero() {
        let g = Interactions::new(3, [&[1u32, 3, 1][..], &[2][..]]);
        assert_eq!(g.edges, vec![(0, 0), (0, 2), (1, 1)]);
        assert_eq!(g.by_user, vec![vec![0, 2], vec![1]]);
        struct Fixed;
        impl GraphModel for Fixed {
            fn vars(&self) -> &[(String, Var)] {
                &[]
            }
            fn loss(&self, _: &Batch, _: &mut Rng) -> Result<Tensor> {
                unreachable!("not trained")
            }
            fn embeddings(&self) -> Result<(Tensor, Tensor)> {
                let dev = Device::Cpu;
                Ok((Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev)?, Tensor::new(&[[2f32, 1.0], [0.0, 3.0]], &dev)?))
            }
        }
        let s = GraphScorer::new(&Fixed, GraphKind::Bm3).unwrap();
        assert_eq!(s.score_users(&[1, 0], &[&[], &[]]).unwrap(), vec![0.0, 1.0, 3.0, 0.0, 2.0, 0.0]);
        assert!(s.score_users(&[2], &[&[]]).unwrap_err().to_string().contains("user 2 is not among the 2"));
        assert!(s.score(&[&[1]]).is_err());
    }
}
