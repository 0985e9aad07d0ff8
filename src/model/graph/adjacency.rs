//! The graphs the graph models propagate over, built once from the training interactions and the
//! frozen item features: the normalised user-item graph (LightGCN), its mean-aggregation form
//! (MMGCN), FREEDOM's modality kNN item-item graphs, and FREEDOM's degree-sensitive edge sampling.
//!
//! Node numbering of the user-item graphs: users 0..U, then items U..U+N (item row r is item index
//! r + 1). A node without edges (an isolated user or item) has an empty row, so propagation gives it
//! zeros and never divides by its zero degree.

use candle_core::{Device, Tensor};
use rand::Rng as _;

use super::sparse::Csr;
use crate::seed::Rng;

/// Degrees of users and items over distinct (user, item-row) edges.
fn degrees(users: usize, items: usize, edges: &[(u32, u32)]) -> (Vec<f32>, Vec<f32>) {
    let (mut du, mut di) = (vec![0f32; users], vec![0f32; items]);
    for &(u, i) in edges {
        du[u as usize] += 1.0;
        di[i as usize] += 1.0;
    }
    (du, di)
}

/// Both directions of every edge with `weight(u, i)`.
fn symmetric(users: usize, items: usize, edges: &[(u32, u32)], weight: impl Fn(u32, u32) -> (f32, f32)) -> Csr {
    let n = (users + items) as u32;
    let mut entries = Vec::with_capacity(edges.len() * 2);
    for &(u, i) in edges {
        let (to_user, to_item) = weight(u, i);
        entries.push((u, users as u32 + i, to_user));
        entries.push((users as u32 + i, u, to_item));
    }
    Csr::from_entries(n as usize, n as usize, entries)
}

/// LightGCN's D^-1/2 A D^-1/2 over the bipartite graph of `edges` (distinct (user, item-row) pairs):
/// edge (u, i) weighs 1 / sqrt(deg(u) deg(i)) in both directions.
pub fn normalized_bipartite(users: usize, items: usize, edges: &[(u32, u32)]) -> Csr {
    let (du, di) = degrees(users, items, edges);
    symmetric(users, items, edges, |u, i| {
        let w = 1.0 / (du[u as usize] * di[i as usize]).sqrt();
        (w, w)
    })
}

/// Mean aggregation (MMGCN): every node averages its neighbours, D^-1 A.
pub fn mean_bipartite(users: usize, items: usize, edges: &[(u32, u32)]) -> Csr {
    let (du, di) = degrees(users, items, edges);
    symmetric(users, items, edges, |u, i| (1.0 / du[u as usize], 1.0 / di[i as usize]))
}

/// The LightGCN weights of `edges` (1 / sqrt(deg(u) deg(i))), in order: FREEDOM's sampling weights.
pub fn edge_weights(users: usize, items: usize, edges: &[(u32, u32)]) -> Vec<f32> {
    let (du, di) = degrees(users, items, edges);
    edges.iter().map(|&(u, i)| 1.0 / (du[u as usize] * di[i as usize]).sqrt()).collect()
}

/// FREEDOM's degree-sensitive edge pruning: `keep` edges drawn without replacement with probability
/// proportional to their weight (Efraimidis-Spirakis: the `keep` largest u^(1/w)), in input order.
pub fn sample_edges(edges: &[(u32, u32)], weights: &[f32], keep: usize, rng: &mut Rng) -> Vec<(u32, u32)> {
    let mut keyed: Vec<(f64, usize)> = weights
        .iter()
        .enumerate()
        .map(|(e, &w)| (rng.random::<f64>().max(f64::MIN_POSITIVE).ln() / w as f64, e))
        .collect();
    let keep = keep.min(edges.len());
    if keep < keyed.len() {
        keyed.select_nth_unstable_by(keep, |a, b| b.0.total_cmp(&a.0));
        keyed.truncate(keep);
    }
    let mut kept: Vec<usize> = keyed.into_iter().map(|(_, e)| e).collect();
    kept.sort_unstable();
    kept.into_iter().map(|e| edges[e]).collect()
}

/// FREEDOM's item-item graph of one modality: each item's `k` most cosine-similar items (itself
/// included, ties to the lower index) with weight 1 / sqrt(r_a r_b), r the row sums (so 1 / k each,
/// as the authors' code computes it). `features` is [n, dim] row-major.
pub fn knn_graph(features: &[f32], n: usize, dim: usize, k: usize) -> candle_core::Result<Csr> {
    let unit: Vec<f32> = features
        .chunks_exact(dim)
        .flat_map(|row| {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            row.iter().map(move |v| v / norm)
        })
        .collect();
    let all = Tensor::from_vec(unit, (n, dim), &Device::Cpu)?;
    let all_t = all.t()?.contiguous()?;
    let k = k.min(n);
    let mut entries = Vec::with_capacity(n * k);
    // Similarities a block of rows at a time: Beauty's 12K x 12K matrix would take 580 MB at once.
    const BLOCK: usize = 1024;
    for start in (0..n).step_by(BLOCK) {
        let rows = BLOCK.min(n - start);
        let sims = all.narrow(0, start, rows)?.matmul(&all_t)?.to_vec2::<f32>()?;
        for (r, sim) in sims.iter().enumerate() {
            let mut order: Vec<u32> = (0..n as u32).collect();
            let by_sim = |a: &u32, b: &u32| sim[*b as usize].total_cmp(&sim[*a as usize]).then(a.cmp(b));
            if k < n {
                order.select_nth_unstable_by(k, by_sim);
                order.truncate(k);
            }
            entries.extend(order.into_iter().map(|c| ((start + r) as u32, c, 1f32)));
        }
    }
    let adj = Csr::from_entries(n, n, entries);
    let rows: Vec<f32> = (0..n).map(|r| adj.row(r).map(|(_, v)| v).sum()).collect();
    let normed = adj.entries().map(|(r, c, v)| (r, c, v / (rows[r as usize] * rows[c as usize]).sqrt())).collect();
    Ok(Csr::from_entries(n, n, normed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knn_keeps_the_nearest_items_with_weight_one_over_k_and_mixes_modalities() {
        // Text: items 0 and 1 point one way, 2 and 3 the other.
        let text = [1.0, 0.0, 0.9, 0.1, 0.0, 1.0, 0.1, 0.9];
        let t = knn_graph(&text, 4, 2, 2).unwrap();
        #[rustfmt::skip]
        assert_eq!(t.to_dense(), vec![
            0.5, 0.5, 0.0, 0.0,
            0.5, 0.5, 0.0, 0.0,
            0.0, 0.0, 0.5, 0.5,
            0.0, 0.0, 0.5, 0.5,
        ]);
        // Image: items 0 and 2 alike, 1 and 3 alike. FREEDOM mixes 0.1 image + 0.9 text.
        let image = [1.0, 0.0, 0.0, 1.0, 1.0, 0.1, 0.1, 1.0];
        let mixed = knn_graph(&image, 4, 2, 2).unwrap().mix(0.1, &t, 0.9);
        let d = mixed.to_dense();
        assert!((d[0] - 0.5).abs() < 1e-6); // (0,0): 0.1 * 0.5 + 0.9 * 0.5
        assert!((d[1] - 0.45).abs() < 1e-6); // (0,1): text only
        assert!((d[2] - 0.05).abs() < 1e-6); // (0,2): image only
        assert_eq!(d[3], 0.0);
    }

    #[test]
    fn bipartite_weights_are_inverse_square_roots_of_the_degrees() {
        // u0: items 0, 1; u1: item 1; u2: nothing (isolated).
        let a = normalized_bipartite(3, 2, &[(0, 0), (0, 1), (1, 1)]).to_dense();
        let at = |r: usize, c: usize| a[r * 5 + c];
        assert!((at(0, 3) - 1.0 / 2f32.sqrt()).abs() < 1e-6); // deg(u0) 2, deg(i0) 1
        assert!((at(0, 4) - 0.5).abs() < 1e-6); // 2, 2
        assert!((at(4, 1) - 1.0 / 2f32.sqrt()).abs() < 1e-6); // i1 -> u1: 2, 1
        assert!(a[2 * 5..3 * 5].iter().all(|&v| v == 0.0), "the isolated user has an empty row");
        let m = mean_bipartite(3, 2, &[(0, 0), (0, 1), (1, 1)]).to_dense();
        assert_eq!((m[3], m[4], m[4 * 5], m[4 * 5 + 1]), (0.5, 0.5, 0.5, 0.5));
    }

    #[test]
    fn edge_sampling_keeps_the_count_and_prefers_heavy_edges() {
        let edges: Vec<(u32, u32)> = (0..100).map(|e| (e, e)).collect();
        // Edge 0 weighs 100 times any other: it survives almost every draw of 10.
        let weights: Vec<f32> = (0..100).map(|e| if e == 0 { 100.0 } else { 1.0 }).collect();
        let mut hits = 0;
        for draw in 0..50 {
            let kept = sample_edges(&edges, &weights, 10, &mut crate::seed::stream(1, "t", draw));
            assert_eq!(kept.len(), 10);
            assert!(kept.windows(2).all(|w| w[0] < w[1]), "distinct, in input order");
            hits += kept.contains(&(0, 0)) as usize;
        }
        assert!(hits >= 45, "{hits}");
        assert_eq!(edge_weights(2, 2, &[(0, 0), (0, 1), (1, 1)]), vec![1.0 / 2f32.sqrt(), 0.5, 1.0 / 2f32.sqrt()]);
    }
}
