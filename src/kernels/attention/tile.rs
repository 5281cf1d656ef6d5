//! The f32 kernel's work on one tile of query rows: scores with `gemm`, the
//! softmax, `p v` into the output's head columns.

use super::Dims;
use super::softmax::softmax_rows;

/// One tile of query rows (`q_t`, `out_t`: `rows × inner`) against all keys, every head.
pub(super) fn attend_tile(
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
