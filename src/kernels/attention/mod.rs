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

use super::contiguous_f32;

mod softmax;
#[cfg(test)]
mod tests;
mod tile;
mod tile_bf16;

use tile::attend_tile;
use tile_bf16::attend_bf16;

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
