//! Scaled dot-product attention (Vaswani et al. 2017), `softmax(q kᵀ · scale) v` per
//! head, as diffusers' `AttnProcessor2_0` computes it with PyTorch's
//! `F.scaled_dot_product_attention` (`models/attention_processor.py`), for the UNet's
//! transformer blocks and the VAE's mid-block attention.
//!
//! [`attention`] takes and returns token-major tensors (`[batch, tokens, heads × d]`,
//! what the q/k/v/out projections produce and consume).
//!
//! - On the CPU in f32, one fused kernel (a custom op) does everything per tile of
//!   query rows: for each head, the tile's scores `q kᵀ` go into a scratch buffer of
//!   a few MB (reused across the tiles a worker takes) with the `gemm` crate, an exact softmax is
//!   taken row by row with a vectorised `exp` (Cody-Waite reduction and the Cephes
//!   `expf` polynomial, about 1 ulp), the unnormalised probabilities are multiplied by
//!   `v` straight into the output's head columns, and each output row is divided by its
//!   sum. Heads are read in place through strides (no split/merge copies), and the
//!   score matrix never exists whole. Tiles run on all cores.
//! - In the CPU's mixed precision (`bf16`: [`super::linear`], chosen in `diffusion::layers`), the same kernel takes
//!   `q kᵀ` and `p v` as bf16 products with f32 sums ([`super::bf16::gemm`], Intel AMX
//!   where present), as PyTorch's bf16 `scaled_dot_product_attention` does: per head,
//!   k and v are packed once, each tile's scaled q and unnormalised probabilities are
//!   rounded to bf16 as they are packed; the softmax stays in f32.
//! - Elsewhere (GPU, f16/bf16, or `SDSERVE_PLAIN_KERNELS=1`): heads are split,
//!   [`chunked_attention`] computes the scores in blocks of query rows bounded by
//!   [`score_budget`] with candle's matmul and softmax, and heads are merged again.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::bf16::{Options, PackedA, PackedB, gemm};
use super::contiguous_f32;
use super::math::exp;

const OP: &str = "attention";

/// Upper bound, in bytes, of one block of f32 attention scores on a GPU (the
/// [`chunked_attention`] path): queries are processed in chunks of rows so that
/// `batch × heads × rows × keys × 4` stays below it.
pub const SCORE_BLOCK_BYTES: usize = 64 << 20;

/// The same bound for [`chunked_attention`] on the CPU, where the block is written by
/// `q·kᵀ`, rewritten by the softmax and read by `probs·v`: a block that stays in
/// cache (benches/README.md, "Figures behind constants in the code").
pub const CPU_SCORE_BLOCK_BYTES: usize = 8 << 20;

/// Target size of the fused CPU kernel's per-thread score buffer (one head, one tile of
/// query rows × all keys). Bigger tiles amortise gemm's per-call packing of k and v
/// (the tile sizes tried: benches/README.md, "Figures behind constants in the code").
const TILE_SCORE_BYTES: usize = 4 << 20;

/// The same for the bf16 kernel, whose packed operands need no amortising: a tile
/// that stays in L2 between the product, the softmax and the packing of the
/// probabilities is fastest.
const TILE_SCORE_BYTES_BF16: usize = 1 << 20;

/// `softmax(q kᵀ · scale) v` for token-major `q: [b, n, heads × d]`, `k, v: [b, m,
/// heads × d]`; returns `[b, n, heads × d]` (heads side by side, as diffusers'
/// `transpose(1, 2).reshape(b, -1, heads * head_dim)` leaves them).
///
/// `upcast` is diffusers' `upcast_attention`: in f16/bf16 the scores are computed in
/// f32. The softmax is always computed in f32. `bf16` (f32 CPU tensors only) takes both
/// products in bf16, for the CPU's mixed precision.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    upcast: bool,
    bf16: bool,
) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    if heads == 0 || !inner.is_multiple_of(heads) {
        candle_core::bail!("{OP}: {inner} channels don't split into {heads} heads");
    }
    let fused = !super::plain_kernels()
        && q.device().is_cpu()
        && [q, k, v].iter().all(|t| t.dtype() == DType::F32);
    if fused {
        let op = FusedAttention {
            heads,
            scale: scale as f32,
            bf16,
        };
        return q
            .contiguous()?
            .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op);
    }
    let d = inner / heads;
    // [b, tokens, heads * d] -> contiguous [b, heads, tokens, d]
    let split = |t: &Tensor| -> Result<Tensor> {
        let (b, tokens, _) = t.dims3()?;
        t.reshape((b, tokens, heads, d))?
            .transpose(1, 2)?
            .contiguous()
    };
    let dtype = q.dtype();
    let score_dtype = if upcast && matches!(dtype, DType::F16 | DType::BF16) {
        DType::F32
    } else {
        dtype
    };
    // The scale is folded into q (N·d multiplications instead of N·M).
    let q = (split(q)?.to_dtype(score_dtype)? * scale)?;
    let k = split(k)?.to_dtype(score_dtype)?;
    let v = split(v)?;
    let out = chunked_attention(&q, &k, &v, score_budget(q.device()))?;
    out.transpose(1, 2)?.reshape((b, n, inner))
}

/// Bytes of f32 attention scores [`chunked_attention`] computes at once on `device`.
pub fn score_budget(device: &candle_core::Device) -> usize {
    if device.is_cpu() {
        CPU_SCORE_BLOCK_BYTES
    } else {
        SCORE_BLOCK_BYTES
    }
}

/// `softmax(q kᵀ) v` for `q: [b, h, n, d]` (already scaled), `k, v: [b, h, m, d]`, all
/// contiguous. Query rows are processed in chunks whose f32 scores fit in `budget` bytes;
/// each row's softmax sees all of its keys, so the result is the unchunked one (up to the
/// matmul kernel's blocking, a few ulps).
/// The scores are computed in `q`'s dtype, the softmax in f32, and `probs · v` in `v`'s.
pub fn chunked_attention(q: &Tensor, k: &Tensor, v: &Tensor, budget: usize) -> Result<Tensor> {
    let (b, h, n, _) = q.dims4()?;
    let m = k.dim(2)?;
    let row_bytes = (b * h * m * DType::F32.size_in_bytes()).max(1);
    let rows = (budget / row_bytes).clamp(1, n.max(1));
    let kt = k.t()?;
    let mut chunks = Vec::with_capacity(n.div_ceil(rows));
    for start in (0..n).step_by(rows) {
        let len = rows.min(n - start);
        let scores = q.narrow(2, start, len)?.matmul(&kt)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?;
        chunks.push(probs.to_dtype(v.dtype())?.matmul(v)?);
    }
    if chunks.len() == 1 {
        Ok(chunks.remove(0))
    } else {
        Tensor::cat(&chunks, 2)
    }
}

/// The fused CPU kernel (module docs).
struct FusedAttention {
    heads: usize,
    scale: f32,
    /// Mixed precision: bf16 products.
    bf16: bool,
}

/// Shapes of one fused attention call.
#[derive(Clone, Copy)]
struct Dims {
    /// Key/value tokens.
    m: usize,
    heads: usize,
    /// Per-head width.
    d: usize,
    /// `heads × d`: the row stride of q, k, v and the output.
    inner: usize,
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "sdserve-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = contiguous_f32(s1, l1, OP, "q")?;
        let k = contiguous_f32(s2, l2, OP, "k")?;
        let v = contiguous_f32(s3, l3, OP, "v")?;
        let (b, n, inner) = l1.shape().dims3()?;
        let (bk, m, inner_k) = l2.shape().dims3()?;
        if l3.shape() != l2.shape() || bk != b || inner_k != inner {
            candle_core::bail!(
                "{OP}: q {:?}, k {:?}, v {:?} don't match",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let dims = Dims {
            m,
            heads: self.heads,
            d: inner / self.heads,
            inner,
        };
        let mut out = vec![0f32; b * n * inner];
        if out.is_empty() || m == 0 {
            // No keys: torch's SDPA gives NaN rows; an empty sum is better refused.
            if !out.is_empty() {
                candle_core::bail!("{OP}: no keys to attend to");
            }
            return Ok((CpuStorage::F32(out), l1.shape().clone()));
        }
        let scale = self.scale;
        if self.bf16 {
            attend_bf16(dims, scale, (q, k, v), &mut out, n);
            return Ok((CpuStorage::F32(out), l1.shape().clone()));
        }
        let tile = query_tile(b, n, m, TILE_SCORE_BYTES);
        out.par_chunks_mut(n * inner)
            .enumerate()
            .for_each(|(bi, out_b)| {
                let q_b = &q[bi * n * inner..(bi + 1) * n * inner];
                let k_b = &k[bi * m * inner..(bi + 1) * m * inner];
                let v_b = &v[bi * m * inner..(bi + 1) * m * inner];
                out_b
                    .par_chunks_mut(tile * inner)
                    .enumerate()
                    .for_each_init(Vec::new, |scratch, (ti, out_t)| {
                        let q_t = &q_b[ti * tile * inner..][..out_t.len()];
                        attend_tile(dims, scale, q_t, k_b, v_b, out_t, scratch);
                    });
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Query rows per task: a score buffer of about `budget` bytes, but small enough
/// that every thread gets several tasks.
fn query_tile(b: usize, n: usize, m: usize, budget: usize) -> usize {
    let by_size = budget / (m * 4).max(1);
    let by_balance = (b * n).div_ceil(4 * rayon::current_num_threads());
    by_size.min(by_balance).clamp(1, n.max(1))
}

/// One tile of query rows (`q_t`, `out_t`: `rows × inner`) against all keys, every head.
fn attend_tile(
    dims: Dims,
    scale: f32,
    q_t: &[f32],
    k: &[f32],
    v: &[f32],
    out_t: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let Dims { m, heads, d, inner } = dims;
    let rows = out_t.len() / inner;
    scratch.resize(rows * m + rows, 0.0);
    let (scores, sums) = scratch.split_at_mut(rows * m);
    for h in 0..heads {
        let col = h * d;
        // SAFETY (both calls): every pointer plus its strides stays inside its slice:
        // q_t is rows × inner, k and v are m × inner, head h is columns col..col+d of
        // each; scores is rows × m; out_t is rows × inner. gemm only reads lhs/rhs and
        // writes dst; the slices don't overlap.
        unsafe {
            // scores = scale · q_h kᵀ_h  (rows × m): lhs rows at stride inner, rhs
            // element (i, j) = k[j, col + i].
            gemm::gemm(
                rows,
                m,
                d,
                scores.as_mut_ptr(),
                1,
                m as isize,
                false,
                q_t.as_ptr().add(col),
                1,
                inner as isize,
                k.as_ptr().add(col),
                inner as isize,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        softmax_rows(scores, m, sums);
        unsafe {
            // out_h = exp(scores - max) v_h  (rows × d), into columns col..col+d.
            gemm::gemm(
                rows,
                d,
                m,
                out_t.as_mut_ptr().add(col),
                1,
                inner as isize,
                false,
                scores.as_ptr(),
                1,
                m as isize,
                v.as_ptr().add(col),
                1,
                inner as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for (row, &sum) in out_t.chunks_exact_mut(inner).zip(sums.iter()) {
            let inv = 1.0 / sum;
            for x in &mut row[col..col + d] {
                *x *= inv;
            }
        }
    }
}

/// The mixed-precision kernel over `out` (`b × n × inner`): per image, every head's
/// k (as `kᵀ`, `d × m`) and v (`m × d`) are packed once, then tiles of query rows run
/// on all cores.
fn attend_bf16(
    dims: Dims,
    scale: f32,
    (q, k, v): (&[f32], &[f32], &[f32]),
    out: &mut [f32],
    n: usize,
) {
    let Dims { m, heads, d, inner } = dims;
    let b = out.len() / (n * inner);
    let tile = query_tile(b, n, m, TILE_SCORE_BYTES_BF16);
    for (bi, out_b) in out.chunks_mut(n * inner).enumerate() {
        let q_b = &q[bi * n * inner..(bi + 1) * n * inner];
        let k_b = &k[bi * m * inner..(bi + 1) * m * inner];
        let v_b = &v[bi * m * inner..(bi + 1) * m * inner];
        let packed: Vec<(PackedB, PackedB)> = (0..heads)
            .into_par_iter()
            .map(|h| {
                let col = h * d;
                (
                    PackedB::from_cols(&k_b[col..], d, m, inner),
                    PackedB::from_rows(&v_b[col..], m, d, inner),
                )
            })
            .collect();
        out_b
            .par_chunks_mut(tile * inner)
            .enumerate()
            .for_each_init(TileScratch::default, |scratch, (ti, out_t)| {
                let q_t = &q_b[ti * tile * inner..][..out_t.len()];
                attend_tile_bf16(dims, scale, q_t, &packed, out_t, scratch);
            });
    }
}

/// Per-worker buffers of [`attend_tile_bf16`], reused across its tiles and heads.
#[derive(Default)]
struct TileScratch {
    scores: Vec<f32>,
    inv_sums: Vec<f32>,
    q_h: Vec<f32>,
    out_h: Vec<f32>,
    /// Packed scaled q and probabilities, kept while the tile height stays the same.
    packed: Option<(PackedA, PackedA)>,
}

/// [`attend_tile`] with bf16 products: `packed[h]` is head `h`'s packed (kᵀ, v).
fn attend_tile_bf16(
    dims: Dims,
    scale: f32,
    q_t: &[f32],
    packed: &[(PackedB, PackedB)],
    out_t: &mut [f32],
    scratch: &mut TileScratch,
) {
    let Dims { m, d, inner, .. } = dims;
    let rows = out_t.len() / inner;
    let TileScratch {
        scores,
        inv_sums,
        q_h,
        out_h,
        packed: ops,
    } = scratch;
    scores.resize(rows * m, 0.0);
    inv_sums.resize(rows, 0.0);
    q_h.resize(rows * d, 0.0);
    out_h.resize(rows * d, 0.0);
    if ops.as_ref().is_none_or(|(q, _)| q.rows() != rows) {
        *ops = Some((PackedA::zeroed(rows, d), PackedA::zeroed(rows, m)));
    }
    let (q_pack, p_pack) = ops.as_mut().expect("just set");
    // Products of one tile are small: run them on this thread.
    let serial = Options {
        overwrite: true,
        parallel: false,
        ..Options::default()
    };
    for (h, (kt, vh)) in packed.iter().enumerate() {
        let col = h * d;
        // The scale is applied to q before rounding (d values a row, not m).
        for (dst, src) in q_h.chunks_exact_mut(d).zip(q_t.chunks_exact(inner)) {
            for (o, &x) in dst.iter_mut().zip(&src[col..col + d]) {
                *o = x * scale;
            }
        }
        q_pack.fill_rows(q_h, d, false);
        gemm(q_pack, kt, scores, m, serial);
        // Each row's softmax is packed while it is still in L1.
        for ((i, row), sum) in scores
            .chunks_exact_mut(m)
            .enumerate()
            .zip(inv_sums.iter_mut())
        {
            softmax_rows(row, m, std::slice::from_mut(sum));
            p_pack.write_row(i, row);
            *sum = 1.0 / *sum;
        }
        gemm(p_pack, vh, out_h, d, serial);
        for ((row, src), &inv) in out_t
            .chunks_exact_mut(inner)
            .zip(out_h.chunks_exact(d))
            .zip(inv_sums.iter())
        {
            for (o, &x) in row[col..col + d].iter_mut().zip(src) {
                *o = x * inv;
            }
        }
    }
}

simd_dispatch! {
    /// Replaces every row of `scores` (`m` wide) by `exp(x - max(row))` and writes each
    /// row's sum to `sums`: the softmax, unnormalised. Uses AVX-512 or AVX2 where the CPU
    /// has them (detected at run time), else the baseline instruction set.
    fn softmax_rows(scores: &mut [f32], m: usize, sums: &mut [f32]) => softmax_rows_body
}

/// Independent accumulators per row pass: one AVX-512 register of f32.
const LANES: usize = 16;

#[inline(always)]
fn softmax_rows_body(scores: &mut [f32], m: usize, sums: &mut [f32]) {
    for (row, sum) in scores.chunks_exact_mut(m).zip(sums.iter_mut()) {
        let max = row_max(row);
        *sum = exp_shifted_in_place(row, max);
    }
}

/// Largest value of `row` (branch-free lanes, so it vectorises).
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &x in lanes.iter().chain(chunks.remainder()) {
        max = if x > max { x } else { max };
    }
    max
}

/// `x ← exp(x - max)` for every element; returns their sum.
#[inline(always)]
fn exp_shifted_in_place(row: &mut [f32], max: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let e = exp(c[i] - max);
            c[i] = e;
            lanes[i] += e;
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        let e = exp(*x - max);
        *x = e;
        sum += e;
    }
    lanes.iter().sum::<f32>() + sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::max_diff;
    use candle_core::Device;

    /// Fixed pseudo-random values in [-2, 2).
    fn fixed(dims: &[usize], salt: f32) -> Tensor {
        crate::kernels::test_util::fixed(dims, salt, 4.0, -2.0)
    }

    /// Plain `softmax(scale · q kᵀ) v` in f64 on `[b, h, tokens, d]` tensors.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let f64_ = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let scores = (f64_(q).matmul(&f64_(k).t().unwrap()).unwrap() * scale).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        probs
            .matmul(&f64_(v))
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    /// `[b, tokens, heads * d]` <-> `[b, heads, tokens, d]`.
    fn split(t: &Tensor, heads: usize) -> Tensor {
        let (b, n, c) = t.dims3().unwrap();
        t.reshape((b, n, heads, c / heads))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    }

    #[test]
    fn chunked_attention_equals_one_block() {
        let q = fixed(&[2, 3, 37, 8], 0.1);
        let k = fixed(&[2, 3, 11, 8], 0.2);
        let v = fixed(&[2, 3, 11, 8], 0.3);
        let want = reference(&q, &k, &v, 1.0);
        // Scores reach |32| here, so f32 rounding of q·k moves outputs by ~1e-5;
        // chunking must stay within that, whatever the chunk size.
        let tolerance = 3e-5;
        let whole = chunked_attention(&q, &k, &v, usize::MAX).unwrap();
        let d = max_diff(&whole, &want);
        assert!(d < tolerance, "one block vs f64: {d}");
        // 5 rows per chunk (2*3*11*4 bytes a row): 8 chunks, the last one short.
        let chunked = chunked_attention(&q, &k, &v, 2 * 3 * 11 * 4 * 5).unwrap();
        assert_eq!(chunked.dims(), &[2, 3, 37, 8]);
        let d = max_diff(&chunked, &want);
        assert!(d < tolerance, "chunked vs f64: {d}");
        // A budget below one row still makes progress, one row at a time.
        let rows = chunked_attention(&q, &k, &v, 1).unwrap();
        let d = max_diff(&rows, &want);
        assert!(d < tolerance, "row by row vs f64: {d}");
    }

    #[test]
    fn fused_attention_matches_f64_reference() {
        // Self-attention-like (m = n, odd sizes so tiles end short) and
        // cross-attention-like (77 keys), 1 to 5 heads, batch 1 and 2. The fused
        // kernel must be about as close to f64 as candle's matmul + softmax path
        // (measured: 6.7e-6 against candle's 9.1e-6 on the first case).
        for &(b, n, m, heads, d) in &[
            (2, 301, 301, 5, 8),
            (1, 64, 77, 1, 40),
            (2, 1000, 77, 3, 16),
            (1, 3, 1, 2, 4),
        ] {
            let q = fixed(&[b, n, heads * d], 0.1);
            let k = fixed(&[b, m, heads * d], 0.2);
            let v = fixed(&[b, m, heads * d], 0.3);
            let scale = 1.0 / (d as f64).sqrt();
            let got = attention(&q, &k, &v, heads, scale, false, false).unwrap();
            assert_eq!(got.dims(), &[b, n, heads * d]);
            let want = reference(
                &split(&q, heads),
                &split(&k, heads),
                &split(&v, heads),
                scale,
            )
            .transpose(1, 2)
            .unwrap()
            .reshape((b, n, heads * d))
            .unwrap();
            let diff = max_diff(&got, &want);
            // The candle path on the same inputs, for scale: f32 rounding of the scores
            // (up to ~11 here) moves every f32 implementation by ~1e-5.
            let chunked = chunked_attention(
                &(split(&q, heads) * scale).unwrap(),
                &split(&k, heads),
                &split(&v, heads),
                CPU_SCORE_BLOCK_BYTES,
            )
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, n, heads * d))
            .unwrap();
            let candle_diff = max_diff(&chunked, &want);
            assert!(
                diff < 3e-5 && diff <= 1.5 * candle_diff + 2e-6,
                "{b}x{n}x{m}, {heads} heads of {d}: fused {diff:e}, candle {candle_diff:e}"
            );
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let q = fixed(&[1, 4, 6], 0.1);
        let k = fixed(&[1, 5, 6], 0.2);
        assert!(
            attention(&q, &k, &k, 4, 1.0, false, false).is_err(),
            "6 channels, 4 heads"
        );
        let v = fixed(&[1, 4, 6], 0.3);
        assert!(
            attention(&q, &k, &v, 2, 1.0, false, false).is_err(),
            "k and v differ"
        );
        let k2 = fixed(&[2, 5, 6], 0.2);
        assert!(
            attention(&q, &k2, &k2, 2, 1.0, false, false).is_err(),
            "batch differs"
        );
        let none = Tensor::zeros((1, 0, 6), DType::F32, &Device::Cpu).unwrap();
        assert!(
            attention(&q, &none, &none, 2, 1.0, false, false).is_err(),
            "no keys"
        );
    }

    #[test]
    fn exp_is_accurate_to_an_ulp_or_two() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.3 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        // f32's epsilon is 1.19e-7: two ulps.
        assert!(worst < 2.4e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
        assert!(exp(1000.0).is_finite() && exp(88.7).is_finite());
        // The dispatched, vectorised softmax pass: every value and the sum against f64.
        let values: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
        let max = values.iter().cloned().fold(f32::MIN, f32::max);
        let mut row = values.clone();
        let mut sums = [0f32];
        softmax_rows(&mut row, values.len(), &mut sums);
        let mut total = 0f64;
        for (i, (&got, &x)) in row.iter().zip(&values).enumerate() {
            let want = ((x - max) as f64).exp();
            total += want;
            assert!(
                (got as f64 - want).abs() <= want * 2.4e-7,
                "{i}: {got} vs {want}"
            );
        }
        let sum_err = (sums[0] as f64 - total).abs() / total;
        assert!(sum_err < 1e-6, "sum off by {sum_err:e}");
    }
}
