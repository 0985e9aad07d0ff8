//! LightGCN propagation (He et al., 2020), the core FREEDOM and BM3 share: E(k+1) = Â E(k) with Â
//! the normalised user-item graph, and the representation is the mean of E(0..=layers).

use candle_core::Tensor;

use super::sparse::SparseMatrix;

/// mean(E, ÂE, ..., Â^layers E) for `ego` [nodes, d].
pub fn propagate(adj: &SparseMatrix, ego: &Tensor, layers: usize) -> candle_core::Result<Tensor> {
    let mut sum = ego.clone();
    let mut e = ego.clone();
    for _ in 0..layers {
        e = adj.matmul(&e)?;
        sum = (sum + &e)?;
    }
    sum.affine(1.0 / (layers + 1) as f64, 0.0)
}

#[cfg(test)]
mod tests {
    use super::super::adjacency::normalized_bipartite;
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn three_users_by_hand() {
        // u0 bought items 0 and 1, u1 item 1, u2 nothing (isolated); item 2 was never bought.
        // Degrees: u0 2, u1 1, i0 1, i1 2. One-dimensional embeddings u = 1, 2, 3; i = 4, 5, 6.
        let adj = SparseMatrix::new(normalized_bipartite(3, 3, &[(0, 0), (0, 1), (1, 1)]));
        let ego =
            Var::from_tensor(&Tensor::new(&[[1f32], [2.], [3.], [4.], [5.], [6.]], &Device::Cpu).unwrap()).unwrap();
        let out = propagate(&adj, ego.as_tensor(), 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let r = 0.5f32.sqrt(); // 1/sqrt(2 * 1)
        let want = [
            (1.0 + (4.0 * r + 5.0 * 0.5)) / 2.0, // u0 <- i0, i1
            (2.0 + 5.0 * r) / 2.0,               // u1 <- i1
            3.0 / 2.0,                           // u2: no neighbours
            (4.0 + 1.0 * r) / 2.0,               // i0 <- u0
            (5.0 + (1.0 * 0.5 + 2.0 * r)) / 2.0, // i1 <- u0, u1
            6.0 / 2.0,                           // i2: no neighbours
        ];
        for (g, w) in out.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{out:?} vs {want:?}");
        }
        // Two layers: u1's second hop reaches u0 through item 1: Â²[u1, u0] = r * 0.5.
        let two = propagate(&adj, ego.as_tensor(), 2).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let u1_layer2 = r * (0.5 * 1.0 + r * 2.0);
        assert!((two[1] - (2.0 + 5.0 * r + u1_layer2) / 3.0).abs() < 1e-6, "{two:?}");
        // The gradient of sum(out) reaches every node, the isolated ones only through layer 0.
        let g = propagate(&adj, ego.as_tensor(), 1).unwrap().sum_all().unwrap().backward().unwrap();
        let g = g.get(ego.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((g[2] - 0.5).abs() < 1e-6 && (g[5] - 0.5).abs() < 1e-6, "{g:?}");
        assert!((g[0] - (1.0 + r + 0.5) / 2.0).abs() < 1e-6, "{g:?}");
    }
}
