//! Causal self-attention for training on the CPU as one op: the query·key scores, the
//! causal and padding mask, the softmax and the product with the values, forward and
//! backward.
//!
//! Composed from candle ops, attention put about fifteen tensors a layer into the graph
//! (reshapes, transposes, copies, two batched products, the scores, the probabilities), and
//! candle's backward pass gives every one a zero tensor and an add, on one thread (perf: a
//! quarter of a LoRA step's wall time was that bookkeeping). This op has three inputs and
//! one output, splits its work by (sequence, key/value head) across threads, and in bf16
//! mixed precision runs its products on `bf16_gemm` like the linear layers (PyTorch's
//! autocast runs attention's batched products in bf16 too).

use super::bf16_gemm::{self, View};
use super::gemm::f32_product;
use super::{cpu_f32, f32_slice, fused};
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

const NAME: &str = "kdpipe-causal-attention";

/// Attention of queries `q` `[batch, heads, seq, head_dim]` (already scaled by
/// 1/√head_dim), keys `k` `[batch, kv_heads, seq, head_dim]` and the value projection `v`
/// `[batch, seq, kv_heads · head_dim]`. Query i of a sequence sees key j when j ≤ i and
/// `keys[batch · seq + j]` is 1 (a real token); a query that sees nothing gets zeros.
/// Query heads share key/value heads in groups as transformers' `repeat_kv` pairs them
/// (heads g·rep … g·rep + rep − 1 read kv head g). Returns `[batch, seq, heads · head_dim]`,
/// ready for the output projection; with `bf16`, the products take bf16 operands and sum
/// in f32. `None` off the CPU or for non-f32 tensors: the caller composes candle ops.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    keys: Arc<Vec<u8>>,
    bf16: bool,
) -> candle_core::Result<Option<Tensor>> {
    if !(fused(q) && fused(k) && fused(v)) {
        return Ok(None);
    }
    let op = CausalAttention {
        keys,
        bf16,
        log_sum_exp: Mutex::new(Vec::new()),
    };
    Ok(Some(q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        op,
    )?))
}

struct CausalAttention {
    /// `[batch × seq]`: 1 for a real token.
    keys: Arc<Vec<u8>>,
    bf16: bool,
    /// Each query row's log-sum-exp over the keys it sees, `[batch, kv_heads, rep · seq]`,
    /// from which the backward pass recomputes the probabilities with one more product.
    /// Keeping the probabilities instead would hold batch · heads · seq² floats a layer
    /// until the backward pass: 283 MB a step for SmolLM2 at 4 × 256, 4.5 GB at 4 × 1024.
    log_sum_exp: Mutex<Vec<f32>>,
}

/// The sizes of one attention call.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    head_dim: usize,
}

impl Dims {
    fn of(q: &Shape, k: &Shape, v: &Shape, keys: usize) -> candle_core::Result<Self> {
        let (batch, heads, seq, head_dim) = q.dims4()?;
        let (kb, kv_heads, kt, khd) = k.dims4()?;
        let (vb, vt, vw) = v.dims3()?;
        let fits = kb == batch
            && vb == batch
            && kt == seq
            && vt == seq
            && khd == head_dim
            && kv_heads > 0
            && heads % kv_heads == 0
            && vw == kv_heads * head_dim
            && keys == batch * seq;
        if !fits {
            candle_core::bail!(
                "{NAME}: q {q:?}, k {k:?}, v {v:?} and a {keys}-key mask do not fit"
            );
        }
        Ok(Self {
            batch,
            heads,
            kv_heads,
            seq,
            head_dim,
        })
    }

    /// Query heads per key/value head.
    fn rep(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Rows of a group's stacked queries: its `rep` heads, one after another.
    fn rows(&self) -> usize {
        self.rep() * self.seq
    }

    /// Group `group` (= batch · kv_heads + kv head) of `[batch, heads, seq, head_dim]`
    /// queries: `rows() × head_dim`, contiguous since a group's heads are adjacent.
    fn queries<'a>(&self, q: &'a [f32], group: usize) -> View<'a> {
        let len = self.rows() * self.head_dim;
        View::row_major(
            &q[group * len..(group + 1) * len],
            self.rows(),
            self.head_dim,
        )
    }

    /// Group `group`'s keys of `[batch, kv_heads, seq, head_dim]`: `seq × head_dim`.
    fn keys<'a>(&self, k: &'a [f32], group: usize) -> View<'a> {
        let len = self.seq * self.head_dim;
        View::row_major(&k[group * len..(group + 1) * len], self.seq, self.head_dim)
    }

    /// Head `head` of sequence `b` in `[batch, seq, n · head_dim]` (n heads side by side):
    /// `seq × head_dim` with row stride `n · head_dim`.
    fn head_of_rows<'a>(&self, x: &'a [f32], n: usize, b: usize, head: usize) -> View<'a> {
        let width = n * self.head_dim;
        View {
            data: &x[b * self.seq * width + head * self.head_dim..],
            rows: self.seq,
            cols: self.head_dim,
            row_stride: width,
            col_stride: 1,
        }
    }
}

/// `c (+)= a · b` on the calling thread, `c` with row stride `ldc`: bf16 operands with f32
/// sums when `bf16`, else f32.
fn product(c: &mut [f32], ldc: usize, a: View, b: View, accumulate: bool, bf16: bool) {
    if bf16 {
        bf16_gemm::gemm_on_this_thread(c, ldc, a, b, accumulate);
    } else {
        f32_product(c, ldc, (a, b), accumulate, 1.0, false);
    }
}

/// Softmax in place over the keys query `i` sees (j ≤ i and `visible[j] == 1`); the other
/// entries become 0, and all of them when it sees none. Returns the log-sum-exp of what it
/// sees (−∞ for nothing).
fn masked_softmax_row(row: &mut [f32], i: usize, visible: &[u8]) -> f32 {
    let seen = |j: &usize| visible[*j] == 1;
    let max = (0..=i)
        .filter(seen)
        .map(|j| row[j])
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return f32::NEG_INFINITY;
    }
    let mut sum = 0f32;
    for (j, x) in row.iter_mut().enumerate() {
        *x = if j <= i && visible[j] == 1 {
            super::fastmath::exp(*x - max)
        } else {
            0.0
        };
        sum += *x;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
    max + sum.ln()
}

/// `masked_softmax_row` again from the row's scores and the log-sum-exp it returned.
fn masked_softmax_row_from(row: &mut [f32], i: usize, visible: &[u8], log_sum_exp: f32) {
    let sees_any = log_sum_exp > f32::NEG_INFINITY;
    for (j, x) in row.iter_mut().enumerate() {
        *x = if sees_any && j <= i && visible[j] == 1 {
            super::fastmath::exp(*x - log_sum_exp)
        } else {
            0.0
        };
    }
}

/// `[batch, n, seq, head_dim]` → `[batch, seq, n · head_dim]`.
fn heads_to_rows(heads: &[f32], d: Dims, n: usize) -> Vec<f32> {
    let (t, hd) = (d.seq, d.head_dim);
    let mut out = vec![0f32; heads.len()];
    out.par_chunks_mut(n * hd).enumerate().for_each(|(row, o)| {
        let (b, i) = (row / t, row % t);
        for h in 0..n {
            let src = ((b * n + h) * t + i) * hd;
            o[h * hd..(h + 1) * hd].copy_from_slice(&heads[src..src + hd]);
        }
    });
    out
}

impl CausalAttention {
    /// Group `group`'s scores Q·Kᵀ into `p` (`rows × seq`).
    fn scores(&self, p: &mut [f32], d: Dims, q: &[f32], k: &[f32], group: usize) {
        let keys = d.keys(k, group).t();
        product(p, d.seq, d.queries(q, group), keys, false, self.bf16);
    }

    /// The key mask of sequence `b`.
    fn visible(&self, d: Dims, b: usize) -> &[u8] {
        &self.keys[b * d.seq..(b + 1) * d.seq]
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            f32_slice(s1, l1, NAME)?,
            f32_slice(s2, l2, NAME)?,
            f32_slice(s3, l3, NAME)?,
        );
        let d = Dims::of(l1.shape(), l2.shape(), l3.shape(), self.keys.len())?;
        let (rows, t, hd) = (d.rows(), d.seq, d.head_dim);
        let mut log_sum_exp = vec![0f32; d.batch * d.kv_heads * rows];
        let mut heads = vec![0f32; d.batch * d.heads * t * hd];
        log_sum_exp
            .par_chunks_mut(rows)
            .zip(heads.par_chunks_mut(rows * hd))
            .enumerate()
            .for_each(|(group, (lse, o))| {
                let (b, g) = (group / d.kv_heads, group % d.kv_heads);
                let mut p = vec![0f32; rows * t];
                self.scores(&mut p, d, q, k, group);
                let visible = self.visible(d, b);
                for (r, (row, lse)) in p.chunks_mut(t).zip(lse.iter_mut()).enumerate() {
                    *lse = masked_softmax_row(row, r % t, visible);
                }
                let values = d.head_of_rows(v, d.kv_heads, b, g);
                product(
                    o,
                    hd,
                    View::row_major(&p, rows, t),
                    values,
                    false,
                    self.bf16,
                );
            });
        let out = heads_to_rows(&heads, d, d.heads);
        *self
            .log_sum_exp
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{NAME}: poisoned lock")))? = log_sum_exp;
        Ok((
            CpuStorage::F32(out),
            Shape::from((d.batch, t, d.heads * hd)),
        ))
    }

    /// Per group, with P the probabilities (recomputed from the scores and the kept
    /// log-sum-exp) and dO the output gradient of its stacked heads: dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(P ⊙ dP)) (the softmax backward;
    /// masked entries have P = 0, so they get none), dQ = dS·K, dK = dSᵀ·Q.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (qd, kd, vd, gd) = (
            cpu_f32(&qs, ql, NAME)?,
            cpu_f32(&ks, kl, NAME)?,
            cpu_f32(&vs, vl, NAME)?,
            cpu_f32(&gs, gl, NAME)?,
        );
        let d = Dims::of(ql.shape(), kl.shape(), vl.shape(), self.keys.len())?;
        let (rows, t, hd, rep) = (d.rows(), d.seq, d.head_dim, d.rep());
        let log_sum_exp = self
            .log_sum_exp
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{NAME}: poisoned lock")))?;
        if log_sum_exp.len() != d.batch * d.kv_heads * rows {
            candle_core::bail!("{NAME}: backward pass without its forward pass");
        }
        let mut dq = vec![0f32; qd.len()];
        let mut dk = vec![0f32; kd.len()];
        let mut dv_heads = vec![0f32; vd.len()];
        dq.par_chunks_mut(rows * hd)
            .zip(dk.par_chunks_mut(t * hd))
            .zip(dv_heads.par_chunks_mut(t * hd))
            .enumerate()
            .for_each(|(group, ((dq, dk), dv))| {
                let (b, kv) = (group / d.kv_heads, group % d.kv_heads);
                let mut p = vec![0f32; rows * t];
                self.scores(&mut p, d, qd, kd, group);
                let visible = self.visible(d, b);
                let lse = &log_sum_exp[group * rows..(group + 1) * rows];
                for (r, (row, &lse)) in p.chunks_mut(t).zip(lse).enumerate() {
                    masked_softmax_row_from(row, r % t, visible, lse);
                }
                let values = d.head_of_rows(vd, d.kv_heads, b, kv);
                let mut ds = vec![0f32; rows * t];
                for r in 0..rep {
                    let out_grad = d.head_of_rows(gd, d.heads, b, kv * rep + r);
                    let p_head = View::row_major(&p[r * t * t..(r + 1) * t * t], t, t);
                    product(dv, hd, p_head.t(), out_grad, r > 0, self.bf16);
                    let dp = &mut ds[r * t * t..(r + 1) * t * t];
                    product(dp, t, out_grad, values.t(), false, self.bf16);
                }
                for (ds_row, p_row) in ds.chunks_mut(t).zip(p.chunks(t)) {
                    let dot = super::fastmath::dot(ds_row, p_row);
                    for (x, p) in ds_row.iter_mut().zip(p_row) {
                        *x = p * (*x - dot);
                    }
                }
                let ds = View::row_major(&ds, rows, t);
                product(dq, hd, ds, d.keys(kd, group), false, self.bf16);
                product(dk, hd, ds.t(), d.queries(qd, group), false, self.bf16);
            });
        let dv = heads_to_rows(&dv_heads, d, d.kv_heads);
        let device = q.device();
        Ok((
            Some(Tensor::from_vec(dq, ql.shape(), device)?),
            Some(Tensor::from_vec(dk, kl.shape(), device)?),
            Some(Tensor::from_vec(dv, vl.shape(), device)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{max_diff, seeded_uniform, weighted_grads};
    use candle_core::{Device, Var, D};

    /// The same attention composed from candle ops: keys and values repeated per query
    /// head, an additive −1e9 bias for masked keys, softmax, product, heads side by side.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, keys: &[u8]) -> Tensor {
        let (b, nh, t, hd) = q.dims4().unwrap();
        let nkv = k.dim(1).unwrap();
        let rep = nh / nkv;
        let repeat = |x: &Tensor| {
            let heads: Vec<Tensor> = (0..nh).map(|h| x.narrow(1, h / rep, 1).unwrap()).collect();
            Tensor::cat(&heads, 1).unwrap()
        };
        let v_heads = v.reshape((b, t, nkv, hd)).unwrap().transpose(1, 2).unwrap();
        let mut bias = vec![0f32; b * t * t];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..t {
                    if j > i || keys[bi * t + j] == 0 {
                        bias[(bi * t + i) * t + j] = -1e9;
                    }
                }
            }
        }
        let bias = Tensor::from_vec(bias, (b, 1, t, t), q.device()).unwrap();
        let scores = q
            .matmul(&repeat(k).t().unwrap().contiguous().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap();
        candle_nn::ops::softmax(&scores, D::Minus1)
            .unwrap()
            .matmul(&repeat(&v_heads).contiguous().unwrap())
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, nh * hd))
            .unwrap()
    }

    /// Values and the gradients of q, k, v (through a random weighting of the output) of
    /// the fused op against the composed one: the largest differences.
    fn compare(bf16: bool) -> (f32, [f32; 3]) {
        let (b, nh, nkv, t, hd) = (2, 6, 2, 7, 8);
        // Seeded, scaled to unit variance: the bf16 check's tolerance holds for these values
        // every run (fresh draws failed it about 1 run in 60).
        let unit = |shape: &[usize], seed| (seeded_uniform(shape, seed) * 3f64.sqrt()).unwrap();
        let q = Var::from_tensor(&unit(&[b, nh, t, hd], 1)).unwrap();
        let k = Var::from_tensor(&unit(&[b, nkv, t, hd], 2)).unwrap();
        let v = Var::from_tensor(&unit(&[b, t, nkv * hd], 3)).unwrap();
        let w = unit(&[b, t, nh * hd], 4);
        // The second sequence is right-padded: its last two tokens are not real.
        let keys: Vec<u8> = [vec![1; t], vec![1, 1, 1, 1, 1, 0, 0]].concat();
        let ours = causal_attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            Arc::new(keys.clone()),
            bf16,
        )
        .unwrap()
        .unwrap();
        let theirs = composed(q.as_tensor(), k.as_tensor(), v.as_tensor(), &keys);
        let g1 = weighted_grads(&ours, &w);
        let g2 = weighted_grads(&theirs, &w);
        let grad_diff = |x: &Var| {
            let (a, b) = (
                g1.get(x.as_tensor()).unwrap(),
                g2.get(x.as_tensor()).unwrap(),
            );
            max_diff(a, b)
                / b.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
        };
        (
            max_diff(&ours, &theirs),
            [grad_diff(&q), grad_diff(&k), grad_diff(&v)],
        )
    }

    /// `compare(bf16)`'s value and gradient differences are all below `tol`.
    fn assert_matches_composed(bf16: bool, tol: f32) {
        let (value, grads) = compare(bf16);
        assert!(value < tol, "values differ by {value}");
        for (name, diff) in ["q", "k", "v"].iter().zip(grads) {
            assert!(
                diff < tol,
                "d{name} differs by {diff} (relative to its largest)"
            );
        }
    }

    #[test]
    fn fused_attention_matches_the_composed_ops_with_grouped_heads_and_padding() {
        assert_matches_composed(false, 1e-5);
    }

    #[test]
    fn bf16_fused_attention_matches_to_bf16_precision() {
        if !bf16_gemm::testable("attention::bf16_fused_attention_matches_to_bf16_precision") {
            return;
        }
        // The bf16 path really ran: its values differ from f32's.
        assert!(
            compare(true).0 > 0.0,
            "the products were not rounded to bf16"
        );
        // bf16 keeps 8 significant bits: relative errors near 2^-8 per operand.
        assert_matches_composed(true, 3e-2);
    }

    #[test]
    fn a_query_that_sees_no_key_gets_zeros_and_no_gradient() {
        let dev = Device::Cpu;
        let q = Var::randn(0f32, 1.0, (1, 2, 3, 4), &dev).unwrap();
        let k = Var::randn(0f32, 1.0, (1, 1, 3, 4), &dev).unwrap();
        let v = Var::randn(0f32, 1.0, (1, 3, 4), &dev).unwrap();
        // Left padding: query 0 sees only key 0, which is not a real token.
        let keys = Arc::new(vec![0, 1, 1]);
        let out = causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), keys, false)
            .unwrap()
            .unwrap();
        let first = out
            .narrow(1, 0, 1)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(first.to_scalar::<f32>().unwrap(), 0.0);
        let grads = out.sum_all().unwrap().backward().unwrap();
        let dq = grads.get(q.as_tensor()).unwrap();
        let dq0 = dq
            .narrow(2, 0, 1)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(dq0.to_scalar::<f32>().unwrap(), 0.0);
        assert!(
            out.narrow(1, 1, 2)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }
}
