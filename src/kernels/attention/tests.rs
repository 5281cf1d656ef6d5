//! The attention kernels against a plain f64 reference.

use super::softmax::softmax_rows;
use super::*;
use crate::kernels::math::exp;
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
