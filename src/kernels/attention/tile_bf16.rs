//! The mixed-precision kernel: k and v packed once per head, bf16 products with
//! f32 sums for `q kᵀ` and `p v`, the softmax in f32.

use rayon::prelude::*;

use super::softmax::softmax_rows;
use super::{Dims, TILE_SCORE_BYTES_BF16, query_tile};
use crate::kernels::bf16::{Options, PackedA, PackedB, gemm};

/// The mixed-precision kernel over `out` (`b × n × inner`): per image, every head's
/// k (as `kᵀ`, `d × m`) and v (`m × d`) are packed once, then tiles of query rows run
/// on all cores.
pub(super) fn attend_bf16(
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
