//! The row softmax both kernels share, unnormalised: `exp(x - max)` in place and
//! each row's sum, with the vectorised `exp` of [`crate::kernels::math`].

use crate::kernels::math::exp;

simd_dispatch! {
    /// Replaces every row of `scores` (`m` wide) by `exp(x - max(row))` and writes each
    /// row's sum to `sums`: the softmax, unnormalised. Uses AVX-512 or AVX2 where the CPU
    /// has them (detected at run time), else the baseline instruction set.
    pub(super) fn softmax_rows(scores: &mut [f32], m: usize, sums: &mut [f32]) => softmax_rows_body
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
