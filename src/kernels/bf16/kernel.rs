//! The 32×32 inner kernel of [`super::gemm`]: `C[32×32] += A[32×k] · B[k×32]` on
//! operands packed by [`super::pack`], `k` a multiple of 32.
//!
//! - [`amx`]: Intel AMX (`TDPBF16PS`, Sapphire Rapids and later): the C block is four
//!   16×16 f32 tiles held in tile registers `tmm0-3`; each step of 32 k loads two A
//!   tiles and two B tiles and issues four tile dot-products. Intel's "Intel® 64 and
//!   IA-32 Architectures Optimization Reference Manual", chapter "Intel AMX", describes
//!   this 2×2 blocking.
//! - [`avx512bf16`]: AVX-512 BF16 (`VDPBF16PS`) dot products on the packed operands as
//!   they are, 8 rows × 32 columns of C in registers.
//! - [`avx2`]: bf16 widened to f32 in L1 scratch, f32 FMA.
//! - [`portable`]: the same arithmetic in plain Rust (bf16 products summed in f32), for
//!   CPUs without AMX and as the reference the AMX kernel is tested against.

use super::pack::{BLOCK, STEP, STEP_ELEMS};

/// `c` (row stride `ldc` f32) += the products of `steps` packed k-steps of A and B;
/// with `overwrite`, `c` = the products (its old values are not read).
///
/// # Safety
/// `a` and `b` must hold `steps * STEP_ELEMS` values, `c` must be valid for 32 rows
/// of 32 values `ldc` apart, touched by no other thread.
pub unsafe fn portable(
    a: *const u16,
    b: *const u16,
    steps: usize,
    c: *mut f32,
    ldc: usize,
    overwrite: bool,
) {
    let mut acc = [[0f32; BLOCK]; BLOCK];
    for s in 0..steps {
        // SAFETY: the caller guarantees `steps` packed steps.
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts(a.add(s * STEP_ELEMS), STEP_ELEMS),
                std::slice::from_raw_parts(b.add(s * STEP_ELEMS), STEP_ELEMS),
            )
        };
        for (i, row) in acc.iter_mut().enumerate() {
            let ar = &a[i * STEP..(i + 1) * STEP];
            for (j, out) in row.iter_mut().enumerate() {
                // B tile j / 16, column j % 16: pair r at (r * 16 + j % 16) * 2.
                let bt = &b[(j / 16) * (STEP_ELEMS / 2)..];
                let mut sum = 0f32;
                for r in 0..STEP / 2 {
                    let o = (r * 16 + j % 16) * 2;
                    sum += bf16(ar[2 * r]) * bf16(bt[o]) + bf16(ar[2 * r + 1]) * bf16(bt[o + 1]);
                }
                *out += sum;
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            // SAFETY: within the 32×32 block the caller guarantees.
            unsafe {
                let c = c.add(i * ldc + j);
                *c = if overwrite { *v } else { *c + v };
            }
        }
    }
}

fn bf16(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// The tile configuration (`LDTILECFG` operand): palette 1, tiles 0-7 all 16 rows of
/// 64 bytes (16 f32 of C, 32 bf16 of A, 16 bf16 pairs of B).
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

#[cfg(target_arch = "x86_64")]
static TILE_CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64; // colsb, u16 little-endian
        c[48 + t] = 16; // rows
        t += 1;
    }
    TileConfig(c)
};

/// Loads [`TILE_CONFIG`] once per thread (`LDTILECFG` costs about as much as a
/// short kernel call). The configuration is thread state that the OS saves and
/// restores with the rest; nothing else in this process uses AMX or changes it (a
/// library that did, e.g. oneDNN, would need this to reconfigure after it). The tile
/// state then stays live in the thread (never `TILERELEASE`d): a larger context to
/// save on switches, in exchange for no per-call configuration.
#[cfg(target_arch = "x86_64")]
fn configure_tiles() {
    thread_local! {
        static CONFIGURED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    CONFIGURED.with(|c| {
        if !c.get() {
            // SAFETY: only called once AMX is usable; the operand is a valid config.
            unsafe {
                std::arch::asm!("ldtilecfg [{cfg}]", cfg = in(reg) TILE_CONFIG.0.as_ptr(), options(nostack));
            }
            c.set(true);
        }
    });
}

/// AMX version of [`portable`].
///
/// # Safety
/// As [`portable`], and AMX must be usable ([`super::amx_usable`] returned true).
#[cfg(target_arch = "x86_64")]
pub unsafe fn amx(
    a: *const u16,
    b: *const u16,
    steps: usize,
    c: *mut f32,
    ldc: usize,
    overwrite: bool,
) {
    // The loop below runs `steps` times, counting down: 0 would wrap around.
    assert!(steps > 0, "AMX kernel: no k-steps");
    let ldc_bytes = ldc * 4;
    configure_tiles();
    // SAFETY: operands as documented; this thread's tiles are configured.
    unsafe {
        if overwrite {
            std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        } else {
            std::arch::asm!(
                "tileloadd tmm0, [{c} + {ldc}*1]",
                "tileloadd tmm1, [{c} + {ldc}*1 + 64]",
                "tileloadd tmm2, [{c16} + {ldc}*1]",
                "tileloadd tmm3, [{c16} + {ldc}*1 + 64]",
                c = in(reg) c,
                c16 = in(reg) c.add(16 * ldc),
                ldc = in(reg) ldc_bytes,
                options(nostack, readonly),
            );
        }
        std::arch::asm!(
            "2:",
            "tileloadd tmm4, [{a} + {s64}*1]",
            "tileloadd tmm6, [{b} + {s64}*1]",
            "tileloadd tmm5, [{a} + {s64}*1 + 1024]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b} + {s64}*1 + 1024]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a}, 2048",
            "add {b}, 2048",
            "dec {n}",
            "jnz 2b",
            "tilestored [{c} + {ldc}*1], tmm0",
            "tilestored [{c} + {ldc}*1 + 64], tmm1",
            "tilestored [{c16} + {ldc}*1], tmm2",
            "tilestored [{c16} + {ldc}*1 + 64], tmm3",
            c = in(reg) c,
            c16 = in(reg) c.add(16 * ldc),
            ldc = in(reg) ldc_bytes,
            s64 = in(reg) 64usize,
            a = inout(reg) a => _,
            b = inout(reg) b => _,
            n = inout(reg) steps => _,
            options(nostack),
        );
    }
}

/// AVX2 and FMA (x86-64 CPUs without AMX, e.g. AMD Zen 2/3): per k-step the 32×32 bf16
/// blocks of A and B are widened to f32 (a bf16 is the top half of an f32: a shift or
/// a mask) into L1-resident scratch, then multiplied in f32 with FMA, four rows × 16
/// columns of C in registers at a time; the C block is accumulated in f32 scratch and
/// written once. Same products and f32 sums as [`portable`], in another order.
///
/// # Safety
/// As [`portable`], and the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2(
    a: *const u16,
    b: *const u16,
    steps: usize,
    c: *mut f32,
    ldc: usize,
    overwrite: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [0f32; BLOCK * BLOCK];
    // A as f32 [32 rows][32 k]; B as f32 [32 k][32 columns].
    let mut af = [0f32; BLOCK * STEP];
    let mut bf = [0f32; STEP * BLOCK];
    // SAFETY (whole body): the caller guarantees `steps` packed steps of A and B and
    // the 32×32 block of C; scratch indices stay within their arrays.
    unsafe {
        let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        for s in 0..steps {
            let (ap, bp) = (a.add(s * STEP_ELEMS), b.add(s * STEP_ELEMS));
            // A's step is 32 rows of 32 consecutive k values.
            for i in (0..STEP_ELEMS).step_by(8) {
                let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(ap.add(i) as *const __m128i));
                _mm256_storeu_ps(
                    af.as_mut_ptr().add(i),
                    _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
                );
            }
            // B's step is two 16-column tiles; in each, k pair r of column j is the two
            // values at (r·16 + j)·2: one 32-bit lane holds (k = 2r, k = 2r + 1).
            for t in 0..BLOCK / 16 {
                for r in 0..STEP / 2 {
                    for half in 0..2 {
                        let at = t * (STEP_ELEMS / 2) + (r * 16 + half * 8) * 2;
                        let v = _mm256_loadu_si256(bp.add(at) as *const __m256i);
                        let even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
                        let odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
                        let col = t * 16 + half * 8;
                        _mm256_storeu_ps(bf.as_mut_ptr().add(2 * r * BLOCK + col), even);
                        _mm256_storeu_ps(bf.as_mut_ptr().add((2 * r + 1) * BLOCK + col), odd);
                    }
                }
            }
            for i0 in (0..BLOCK).step_by(4) {
                for j0 in (0..BLOCK).step_by(16) {
                    let mut lo = [_mm256_setzero_ps(); 4];
                    let mut hi = [_mm256_setzero_ps(); 4];
                    for (r, (lo, hi)) in lo.iter_mut().zip(hi.iter_mut()).enumerate() {
                        let cp = acc.as_ptr().add((i0 + r) * BLOCK + j0);
                        *lo = _mm256_loadu_ps(cp);
                        *hi = _mm256_loadu_ps(cp.add(8));
                    }
                    for kk in 0..STEP {
                        let b0 = _mm256_loadu_ps(bf.as_ptr().add(kk * BLOCK + j0));
                        let b1 = _mm256_loadu_ps(bf.as_ptr().add(kk * BLOCK + j0 + 8));
                        for r in 0..4 {
                            let av = _mm256_broadcast_ss(&af[(i0 + r) * STEP + kk]);
                            lo[r] = _mm256_fmadd_ps(av, b0, lo[r]);
                            hi[r] = _mm256_fmadd_ps(av, b1, hi[r]);
                        }
                    }
                    for (r, (lo, hi)) in lo.iter().zip(hi.iter()).enumerate() {
                        let cp = acc.as_mut_ptr().add((i0 + r) * BLOCK + j0);
                        _mm256_storeu_ps(cp, *lo);
                        _mm256_storeu_ps(cp.add(8), *hi);
                    }
                }
            }
        }
        for i in 0..BLOCK {
            for j in (0..BLOCK).step_by(8) {
                let cp = c.add(i * ldc + j);
                let v = _mm256_loadu_ps(acc.as_ptr().add(i * BLOCK + j));
                let v = if overwrite {
                    v
                } else {
                    _mm256_add_ps(_mm256_loadu_ps(cp), v)
                };
                _mm256_storeu_ps(cp, v);
            }
        }
    }
}

/// AVX-512 BF16 (`VDPBF16PS`: AMD Zen 4/5, Intel Cooper Lake, and every AMX CPU): the
/// instruction takes B's packed layout as it is, one 32-bit lane = the (k = 2r,
/// k = 2r + 1) pair of one column, so one B tile row of 16 columns is one register.
/// C is done in chunks of [`AVX512_ROWS`] rows × 32 columns held in registers
/// (2 × 8 accumulators) across all k-steps; per k pair, each row's A pair is broadcast
/// from memory and multiplied into both column halves. Each `VDPBF16PS` lane adds the
/// two exact products in f32 (Intel SDM, "VDPBF16PS": odd pair first, round to nearest
/// even, f32 denormals flushed to zero), so the sums match [`portable`]'s up to order.
///
/// # Safety
/// As [`portable`], and [`super::avx512bf16_usable`] is true.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn avx512bf16(
    a: *const u16,
    b: *const u16,
    steps: usize,
    c: *mut f32,
    ldc: usize,
    overwrite: bool,
) {
    // Pair p of step s: tile 0's row at s·STEP_ELEMS + 32p, tile 1's half a step on.
    let row = |q: usize| unsafe { b.add((q / (STEP / 2)) * STEP_ELEMS + (q % (STEP / 2)) * 32) };
    // SAFETY: as this function's.
    unsafe { avx512bf16_rows(a, steps * STEP / 2, row, STEP_ELEMS / 2, c, ldc, overwrite) }
}

/// [`avx512bf16`] with B read in place instead of packed: k pair `q` of the block's 32
/// columns is the 32 consecutive pairs at `b + koff[q]` (in pairs; see
/// [`super::PairRows`]), and only the first `pairs` k pairs are multiplied.
///
/// # Safety
/// As [`avx512bf16`] for `a` and `c`; `koff` holds `pairs` offsets and 32 pairs are
/// readable at `b + koff[q]` for each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn avx512bf16_in_place(
    a: *const u16,
    b: *const u32,
    koff: &[usize],
    c: *mut f32,
    ldc: usize,
    overwrite: bool,
) {
    let row = |q: usize| unsafe { b.add(*koff.get_unchecked(q)).cast::<u16>() };
    // SAFETY: as this function's; tile 1 (columns 16-31) is 16 pairs = 32 halves on.
    unsafe { avx512bf16_rows(a, koff.len(), row, 32, c, ldc, overwrite) }
}

/// The body of both AVX-512 BF16 kernels: `pairs` k pairs, B's row of pair `q` (16
/// columns) at `row(q)` and the next 16 columns `tile1` halves on.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn avx512bf16_rows(
    a: *const u16,
    pairs: usize,
    row: impl Fn(usize) -> *const u16,
    tile1: usize,
    c: *mut f32,
    ldc: usize,
    overwrite: bool,
) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): the callers guarantee `pairs` k pairs of A (packed, so a
    // step's 32 rows of 16 pairs each) and of B, and the 32×32 block of C.
    unsafe {
        for i0 in (0..BLOCK).step_by(AVX512_ROWS) {
            let mut acc = [[_mm512_setzero_ps(); 2]; AVX512_ROWS];
            if !overwrite {
                for (r, acc) in acc.iter_mut().enumerate() {
                    let cp = c.add((i0 + r) * ldc);
                    *acc = [_mm512_loadu_ps(cp), _mm512_loadu_ps(cp.add(16))];
                }
            }
            for s in 0..pairs.div_ceil(STEP / 2) {
                let ap = a.add(s * STEP_ELEMS + i0 * STEP).cast::<i32>();
                for p in 0..(STEP / 2).min(pairs - s * STEP / 2) {
                    let bp = row(s * STEP / 2 + p);
                    let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.cast()));
                    let b1: __m512bh =
                        std::mem::transmute(_mm512_loadu_si512(bp.add(tile1).cast()));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(
                            ap.add(r * STEP / 2 + p).read_unaligned(),
                        ));
                        acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                        acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let cp = c.add((i0 + r) * ldc);
                _mm512_storeu_ps(cp, acc[0]);
                _mm512_storeu_ps(cp.add(16), acc[1]);
            }
        }
    }
}

/// Rows of C per register chunk in [`avx512bf16`]: 8 rows × 2 registers = 16
/// accumulators, leaving registers for B's two and the broadcasts.
#[cfg(target_arch = "x86_64")]
const AVX512_ROWS: usize = 8;
