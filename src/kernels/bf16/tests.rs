use super::pack::to_bf16;
use super::*;

/// `n` values in [-1, 1) from a xorshift generator seeded by `seed`.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn bf(x: f32) -> f64 {
    f32::from_bits((to_bf16(x) as u32) << 16) as f64
}

/// `c0 + A·B` in f64 from the bf16-rounded operands; `a` is `m × k` row-major,
/// `b` `k × n` row-major.
fn reference(a: &[f32], b: &[f32], c0: &[f32], (m, n, k): (usize, usize, usize)) -> Vec<f64> {
    let mut out: Vec<f64> = c0.iter().map(|&v| v as f64).collect();
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] += (0..k)
                .map(|p| bf(a[i * k + p]) * bf(b[p * n + j]))
                .sum::<f64>();
        }
    }
    out
}

fn check(kernel: Kernel, (m, n, k): (usize, usize, usize)) {
    let a = values(m * k, 1);
    let b = values(k * n, 2);
    let c0 = values(m * n, 3);
    let want = reference(&a, &b, &c0, (m, n, k));
    let pa = PackedA::from_rows(&a, m, k, k);
    // B both ways: rows as given, and columns of its transpose.
    let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
    let pbs = [
        PackedB::from_rows(&b, k, n, n),
        PackedB::from_cols(&bt, k, n, k),
    ];
    for (pb, overwrite) in pbs.iter().zip([false, true]) {
        // Overwriting must ignore C's old values: start from garbage, expect A·B.
        let mut c = if overwrite {
            vec![f32::NAN; m * n]
        } else {
            c0.clone()
        };
        let want: Vec<f64> = if overwrite {
            want.iter().zip(&c0).map(|(&w, &c)| w - c as f64).collect()
        } else {
            want.clone()
        };
        let opts = Options {
            kernel,
            overwrite,
            parallel: true,
        };
        gemm(&pa, pb, &mut c, n, opts);
        let err = c
            .iter()
            .zip(&want)
            .map(|(&g, &w)| (g as f64 - w).abs())
            .fold(0.0, f64::max);
        // f32 sums of k products: rounding error grows like sqrt(k) ulps of the
        // partial sums (a misplaced operand would be off by O(1)).
        let scale = want.iter().fold(1.0, |acc: f64, w| acc.max(w.abs()));
        let tol = 6e-8 * 8.0 * (k as f64).sqrt() * scale;
        assert!(err < tol, "{kernel:?} m{m} n{n} k{k}: error {err} > {tol}");
    }
}

const SHAPES: [(usize, usize, usize); 9] = [
    (1, 1, 1),
    (32, 32, 32),
    (17, 5, 3),     // everything partial, odd k
    (33, 47, 65),   // one past the block edges
    (154, 320, 77), // cross-attention k/v shape, odd k
    (64, 96, 1030), // several k passes (K_STEPS * 32 = 512)
    (130, 260, 40), // several macro tiles on both sides, with edges
    (2, 1280, 320), // time embedding: two rows
    (4, 300, 288),  // conv_out: four output channels
];

/// Every kernel this CPU can run (the portable one everywhere); the others say so.
#[test]
fn every_usable_kernel_matches_f64_reference() {
    for kernel in Kernel::ALL {
        if !kernel.usable() {
            eprintln!(
                "this CPU can't run the {} kernel: not checked here",
                kernel.name()
            );
            continue;
        }
        for s in SHAPES {
            check(kernel, s);
        }
    }
}

#[test]
fn the_kernel_this_machine_uses_matches_f64_reference() {
    let kernel = Kernel::best();
    eprintln!("bf16 gemm kernel on this machine: {}", kernel.name());
    for s in SHAPES {
        check(kernel, s);
    }
}

#[test]
fn ldc_wider_than_n_leaves_other_columns_alone() {
    let (m, n, k, ldc) = (40, 20, 50, 29);
    let a = values(m * k, 4);
    let b = values(k * n, 5);
    let mut c = vec![7.0f32; m * ldc];
    gemm(
        &PackedA::from_rows(&a, m, k, k),
        &PackedB::from_rows(&b, k, n, n),
        &mut c,
        ldc,
        Options::default(),
    );
    let want = reference(&a, &b, &vec![7.0; m * n], (m, n, k));
    for i in 0..m {
        for j in 0..ldc {
            let got = c[i * ldc + j] as f64;
            if j < n {
                assert!((got - want[i * n + j]).abs() < 1e-4, "({i},{j})");
            } else {
                assert_eq!(got, 7.0, "column {j} outside C was written");
            }
        }
    }
}

#[test]
fn rounding_is_to_nearest_even_like_pytorch() {
    for x in values(10_000, 6).into_iter().map(|v| v * 1e3) {
        assert_eq!(to_bf16(x), half::bf16::from_f32(x).to_bits(), "{x}");
    }
    // Ties: 1 + 2^-8 is halfway between 1 and 1 + 2^-7: rounds to even (1).
    assert_eq!(to_bf16(1.0 + 2f32.powi(-8)), to_bf16(1.0));
    assert_eq!(
        to_bf16(1.0 + 3.0 * 2f32.powi(-8)),
        to_bf16(1.0 + 2f32.powi(-6))
    );
    assert!(f32::from_bits((to_bf16(f32::NAN) as u32) << 16).is_nan());
    assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
}

#[test]
fn refilled_operand_with_fewer_columns_multiplies_like_a_fresh_one() {
    let (m, k) = (40, 70);
    let a = values(m * k, 7);
    let pa = PackedA::from_rows(&a, m, k, k);
    let mut reused = PackedB::with_capacity(k, 300);
    for n in [300, 257, 33, 1] {
        let b = values(k * n, n as u64);
        let koff: Vec<usize> = (0..k).map(|kk| kk * n).collect();
        let poff: Vec<usize> = (0..n).collect();
        reused.refill_gather(&b, &koff, &poff);
        assert_eq!(reused.cols(), n);
        let (mut got, mut want) = (vec![0f32; m * n], vec![0f32; m * n]);
        gemm(&pa, &reused, &mut got, n, Options::default());
        gemm(
            &pa,
            &PackedB::from_rows(&b, k, n, n),
            &mut want,
            n,
            Options::default(),
        );
        assert_eq!(got, want, "{n} columns");
    }
}
