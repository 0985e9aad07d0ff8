//! A sparse matrix (CSR, f32) and its product with a dense tensor as a candle op with its own
//! backward: d(A x)/dx applied to an upstream gradient g is Aᵀ g, itself the same op on the
//! transpose. Graph propagation over Beauty's user-item graph (34K nodes, 300K edges) this way never
//! builds a dense adjacency or an [edges, dim] intermediate.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

/// A sparse `rows x cols` matrix in compressed-row form.
#[derive(Debug, Clone, PartialEq)]
pub struct Csr {
    pub rows: usize,
    pub cols: usize,
    /// Row r's entries are `indptr[r]..indptr[r + 1]`.
    indptr: Vec<usize>,
    indices: Vec<u32>,
    values: Vec<f32>,
}

impl Csr {
    /// From (row, col, value) entries in any order; entries at the same place are summed.
    pub fn from_entries(rows: usize, cols: usize, mut entries: Vec<(u32, u32, f32)>) -> Self {
        entries.sort_by_key(|&(r, c, _)| (r, c));
        let mut indptr = vec![0usize; rows + 1];
        let (mut indices, mut values): (Vec<u32>, Vec<f32>) = (Vec::new(), Vec::new());
        let mut last: Option<(u32, u32)> = None;
        for (r, c, v) in entries {
            if last == Some((r, c)) {
                *values.last_mut().expect("a previous entry") += v;
                continue;
            }
            last = Some((r, c));
            indptr[r as usize + 1] += 1;
            indices.push(c);
            values.push(v);
        }
        for r in 0..rows {
            indptr[r + 1] += indptr[r];
        }
        Self { rows, cols, indptr, indices, values }
    }

    pub fn nnz(&self) -> usize {
        self.values.len()
    }

    /// Every entry as (row, col, value), by row then column.
    pub fn entries(&self) -> impl Iterator<Item = (u32, u32, f32)> + '_ {
        (0..self.rows).flat_map(move |r| {
            (self.indptr[r]..self.indptr[r + 1]).map(move |e| (r as u32, self.indices[e], self.values[e]))
        })
    }

    /// The entries of row `r` as (col, value).
    pub fn row(&self, r: usize) -> impl Iterator<Item = (u32, f32)> + '_ {
        (self.indptr[r]..self.indptr[r + 1]).map(move |e| (self.indices[e], self.values[e]))
    }

    pub fn transpose(&self) -> Self {
        Self::from_entries(self.cols, self.rows, self.entries().map(|(r, c, v)| (c, r, v)).collect())
    }

    /// `a * self + b * other` (same shape).
    pub fn mix(&self, a: f32, other: &Csr, b: f32) -> Self {
        let entries =
            self.entries().map(|(r, c, v)| (r, c, a * v)).chain(other.entries().map(|(r, c, v)| (r, c, b * v)));
        Self::from_entries(self.rows, self.cols, entries.collect())
    }

    /// The dense matrix, row-major (tests).
    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, c, v) in self.entries() {
            out[r as usize * self.cols + c as usize] += v;
        }
        out
    }

    /// y = self · x for row-major x [cols, d].
    fn apply(&self, x: &[f32], d: usize) -> Vec<f32> {
        let mut y = vec![0f32; self.rows * d];
        for (r, out) in y.chunks_exact_mut(d.max(1)).enumerate().take(self.rows) {
            for (c, v) in self.row(r) {
                let src = &x[c as usize * d..(c as usize + 1) * d];
                out.iter_mut().zip(src).for_each(|(o, s)| *o += v * s);
            }
        }
        y
    }
}

/// A sparse matrix ready to multiply tensors, with its transpose for the backward pass.
#[derive(Debug, Clone)]
pub struct SparseMatrix {
    a: Arc<Csr>,
    at: Arc<Csr>,
}

impl SparseMatrix {
    pub fn new(a: Csr) -> Self {
        let at = a.transpose();
        Self { a: Arc::new(a), at: Arc::new(at) }
    }

    pub fn csr(&self) -> &Csr {
        &self.a
    }

    /// A · x for x [cols, d] (f32 on the CPU): [rows, d], differentiable in x.
    pub fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(SpMm { a: self.a.clone(), at: self.at.clone() })
    }
}

struct SpMm {
    a: Arc<Csr>,
    at: Arc<Csr>,
}

impl CustomOp1 for SpMm {
    fn name(&self) -> &'static str {
        "sparse-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, d) = l.shape().dims2()?;
        if rows != self.a.cols {
            candle_core::bail!("sparse matmul: a {}x{} matrix times {rows} rows", self.a.rows, self.a.cols);
        }
        let x = match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((from, to))) => &v[from..to],
            _ => candle_core::bail!("sparse matmul needs a contiguous f32 operand"),
        };
        Ok((CpuStorage::F32(self.a.apply(x, d)), Shape::from((self.a.rows, d))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let transposed = SpMm { a: self.at.clone(), at: self.a.clone() };
        Ok(Some(grad_res.contiguous()?.apply_op1(transposed)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn product_and_gradient_match_the_dense_matrix() {
        let dev = Device::Cpu;
        // 3x4 with a duplicate entry at (0, 1) that must be summed.
        let a = Csr::from_entries(3, 4, vec![(2, 3, 0.5), (0, 1, 1.0), (1, 0, -2.0), (0, 1, 0.25), (2, 0, 3.0)]);
        assert_eq!(a.nnz(), 4);
        let dense = Tensor::from_vec(a.to_dense(), (3, 4), &dev).unwrap();
        assert_eq!(a.to_dense()[1], 1.25);
        let x = Var::from_tensor(&Tensor::from_vec((0..8).map(|v| v as f32 - 3.0).collect(), (4, 2), &dev).unwrap())
            .unwrap();
        let up = Tensor::from_vec(vec![1f32, -1.0, 2.0, 0.5, -3.0, 1.5], (3, 2), &dev).unwrap();
        let sparse = SparseMatrix::new(a);
        let y = sparse.matmul(x.as_tensor()).unwrap();
        let want = dense.matmul(x.as_tensor()).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
        let g_sparse = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g_dense = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g_sparse.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap(),
            g_dense.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap()
        );
        // Two products in a row (two propagation layers) differentiate through both.
        let two = sparse.csr().transpose();
        let y2 = SparseMatrix::new(two).matmul(&sparse.matmul(x.as_tensor()).unwrap()).unwrap();
        let g = y2.sum_all().unwrap().backward().unwrap();
        let at_a = dense.t().unwrap().matmul(&dense).unwrap();
        let want: Vec<f32> = at_a.sum(0).unwrap().to_vec1::<f32>().unwrap();
        for row in g.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap().iter().zip(&want) {
            assert!(row.0.iter().all(|v| (v - row.1).abs() < 1e-5), "{row:?}");
        }
    }
}
