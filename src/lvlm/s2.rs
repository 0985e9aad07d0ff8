//! S2, the item enhancer: each item is described as its title plus its picture's caption, the text is
//! encoded by the job's BERT-family sentence encoder, and the vectors initialise SASRec's item table,
//! which then trains as usual (so S2 costs at inference what SASRec costs).
//!
//! The encoder's width (384 for all-MiniLM-L6-v2, 768 for bert-base) rarely is SASRec's (512 in
//! MSRBench). The vectors are centred (sentence vectors share a large common direction), scaled to unit
//! length and mapped into SASRec's width by a seeded matrix with orthonormal rows when the encoder is
//! narrower, or orthonormal columns when it is wider (Gram-Schmidt on Gaussian draws): narrower to
//! wider keeps every dot product between items exactly. Rows are then scaled to the length a
//! Xavier-initialised row has, so training starts at SASRec's usual scale.

use crate::data::Item;
use crate::features::captions::Captions;
use crate::seed::{standard_normal, stream};

/// What the encoder reads for an item: "Title: t. Image: caption." (the caption when there is one).
pub fn item_text(item: &Item, captions: Option<&Captions>) -> String {
    let title = item.meta.title.trim();
    let title = if title.is_empty() { "no title" } else { title };
    match captions.and_then(|c| c.get(item.index)) {
        Some(c) => format!("Title: {}. Image: {}.", title.trim_end_matches('.'), c.trim().trim_end_matches('.')),
        None => format!("Title: {}.", title.trim_end_matches('.')),
    }
}

/// A `rows x cols` matrix (row-major) with orthonormal rows (rows <= cols) or columns (rows > cols).
fn orthonormal(rows: usize, cols: usize, seed: u64) -> Vec<f64> {
    let (n, len) = if rows <= cols { (rows, cols) } else { (cols, rows) };
    let mut rng = stream(seed, "s2/projection", 0);
    let mut basis: Vec<Vec<f64>> = Vec::with_capacity(n);
    while basis.len() < n {
        let mut v: Vec<f64> = (0..len).map(|_| standard_normal(&mut rng)).collect();
        for b in &basis {
            let d: f64 = v.iter().zip(b).map(|(x, y)| x * y).sum();
            v.iter_mut().zip(b).for_each(|(x, y)| *x -= d * y);
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-6 {
            basis.push(v.into_iter().map(|x| x / norm).collect());
        }
    }
    let mut m = vec![0.0; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            m[r * cols + c] = if rows <= cols { basis[r][c] } else { basis[c][r] };
        }
    }
    m
}

/// SASRec's initial item table `[(items + 1) x width]` (row 0, the padding, stays zero) from text
/// vectors `[items x dim]` in item order.
pub fn item_table(vectors: &[f32], dim: usize, width: usize, seed: u64) -> Vec<f32> {
    let items = vectors.len() / dim;
    let mut mean = vec![0f64; dim];
    for row in vectors.chunks(dim) {
        mean.iter_mut().zip(row).for_each(|(m, v)| *m += *v as f64 / items as f64);
    }
    let p = orthonormal(dim, width, seed);
    // The expected length of a Xavier-normal row of a [(items + 1), width] table.
    let target = (width as f64 * 2.0 / (items + 1 + width) as f64).sqrt();
    let mut out = vec![0f32; (items + 1) * width];
    for (i, row) in vectors.chunks(dim).enumerate() {
        let centred: Vec<f64> = row.iter().zip(&mean).map(|(v, m)| *v as f64 - m).collect();
        let norm = centred.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        let dst = &mut out[(i + 1) * width..(i + 2) * width];
        for (c, d) in dst.iter_mut().enumerate() {
            let v: f64 = (0..dim).map(|k| centred[k] * p[k * width + c]).sum();
            *d = (v / norm * target) as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ingest::ItemMeta;

    #[test]
    fn item_text_has_the_caption_when_there_is_one() {
        let item = Item {
            index: 1,
            id: "a".into(),
            meta: ItemMeta { title: "Red lamp.".into(), ..Default::default() },
            image: None,
        };
        assert_eq!(item_text(&item, None), "Title: Red lamp.");
        let caps = Captions::from_pairs("test", [(1, "a lamp on a desk.".to_string())]);
        assert_eq!(item_text(&item, Some(&caps)), "Title: Red lamp. Image: a lamp on a desk.");
    }

    #[test]
    fn the_table_keeps_the_geometry_of_the_centred_vectors() {
        // Three 2-d vectors into width 4: dot products of the centred, unit vectors survive.
        let v = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
        let t = item_table(&v, 2, 4, 7);
        assert_eq!(t.len(), 4 * 4);
        assert!(t[..4].iter().all(|x| *x == 0.0), "padding row");
        let mean = [2.0 / 3.0, 2.0 / 3.0];
        let unit = |i: usize| {
            let c = [v[2 * i] as f64 - mean[0], v[2 * i + 1] as f64 - mean[1]];
            let n = (c[0] * c[0] + c[1] * c[1]).sqrt();
            [c[0] / n, c[1] / n]
        };
        let target2 = 4.0 * 2.0 / (3.0 + 1.0 + 4.0);
        for a in 0..3 {
            for b in 0..3 {
                let want = (unit(a)[0] * unit(b)[0] + unit(a)[1] * unit(b)[1]) * target2;
                let got: f64 = (0..4).map(|c| t[(a + 1) * 4 + c] as f64 * t[(b + 1) * 4 + c] as f64).sum();
                assert!((got - want).abs() < 1e-6, "{a}·{b}: {got} vs {want}");
            }
        }
        assert_eq!(t, item_table(&v, 2, 4, 7), "seeded");
    }

    #[test]
    fn projections_are_orthonormal_both_ways() {
        for (r, c) in [(3, 5), (5, 3)] {
            let m = orthonormal(r, c, 1);
            // The short side's vectors: rows of m, or its columns.
            let (n, len) = (r.min(c), r.max(c));
            let at = |i: usize, k: usize| if r <= c { m[i * c + k] } else { m[k * c + i] };
            for i in 0..n {
                for j in 0..n {
                    let d: f64 = (0..len).map(|k| at(i, k) * at(j, k)).sum();
                    assert!((d - if i == j { 1.0 } else { 0.0 }).abs() < 1e-9);
                }
            }
        }
    }
}
