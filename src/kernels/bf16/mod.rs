//! bf16 matrix multiplication on the CPU: `C (f32) += A · B` with both operands
//! rounded to bf16 and products summed in f32, what PyTorch's CPU bf16 matmul (oneDNN)
//! computes. It backs the `bf16` dtype on the CPU ([`super::linear`], [`super::conv`]):
//! weights are stored packed in bf16 (half the memory of f32), activations stay f32
//! between layers and are rounded to bf16 as they enter a matmul.
//!
//! [`gemm`] is blocked in the classic GotoBLAS way (Goto & van de Geijn 2008, "Anatomy of
//! High-Performance Matrix Multiplication"): macro tiles of C sized for the L2 cache run
//! on all cores, inner 32×32 blocks run a [`kernel`]: Intel AMX tile instructions where
//! the CPU and OS allow them ([`amx_usable`]), else AVX-512 BF16 dot products
//! ([`avx512bf16_usable`]: AMD Zen 4/5), else AVX2 and FMA on bf16 widened to f32
//! ([`avx2_usable`]: about the f32 path's speed, with half its weight memory), else a
//! portable kernel (correct, but far slower than the f32 path).

pub mod kernel;
pub mod pack;

pub use pack::{PackedA, PackedB, avx512bf16_usable, to_pairs};

use super::SendPtr;
use pack::{BLOCK, STEP};
use rayon::prelude::*;

/// Which inner kernel [`gemm`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Intel AMX (`TDPBF16PS`).
    Amx,
    /// AVX-512 BF16 (`VDPBF16PS`: AMD Zen 4/5, Intel Cooper Lake and later).
    Avx512Bf16,
    /// AVX2 and FMA: bf16 widened to f32, f32 FMA (about f32's speed, half its
    /// weight memory).
    Avx2,
    /// Plain Rust.
    Portable,
}

impl Kernel {
    /// Every kernel, fastest first.
    pub const ALL: [Kernel; 4] = [
        Kernel::Amx,
        Kernel::Avx512Bf16,
        Kernel::Avx2,
        Kernel::Portable,
    ];

    /// The kernel [`gemm`] runs by default: the one `SDSERVE_BF16_KERNEL` names (see
    /// [`Kernel::configured`]; an invalid value is ignored here, and refused where a
    /// model loads), else the fastest usable one. `SDSERVE_AMX=0` skips AMX.
    pub fn best() -> Self {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| Self::configured().unwrap_or_else(|_| Self::fastest()))
    }

    /// The kernel `SDSERVE_BF16_KERNEL` names when it is set, else the fastest usable
    /// one; an error says why a named kernel can't run here.
    pub fn configured() -> Result<Self, String> {
        let Ok(name) = std::env::var("SDSERVE_BF16_KERNEL") else {
            return Ok(Self::fastest());
        };
        let names = || Self::ALL.map(Kernel::name).join(", ");
        match Self::ALL.into_iter().find(|k| k.name() == name.trim()) {
            None => Err(format!(
                "unknown bf16 kernel {name:?} (one of: {})",
                names()
            )),
            Some(k) if !k.usable() => Err(format!(
                "this CPU can't run the {name} kernel (usable here: {})",
                Self::ALL
                    .into_iter()
                    .filter(|k| k.usable())
                    .map(Kernel::name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Some(k) => Ok(k),
        }
    }

    fn fastest() -> Self {
        let no_amx = std::env::var("SDSERVE_AMX").is_ok_and(|v| v == "0" || v == "false");
        Self::ALL
            .into_iter()
            .find(|&k| k.usable() && !(no_amx && k == Kernel::Amx))
            .unwrap_or(Kernel::Portable)
    }

    /// Whether this CPU (and OS) can run the kernel.
    pub fn usable(self) -> bool {
        match self {
            Kernel::Amx => amx_usable(),
            Kernel::Avx512Bf16 => avx512bf16_usable(),
            Kernel::Avx2 => avx2_usable(),
            Kernel::Portable => true,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "amx",
            Kernel::Avx512Bf16 => "avx512bf16",
            Kernel::Avx2 => "avx2",
            Kernel::Portable => "portable",
        }
    }

    /// How this kernel multiplies, in words, for a log line.
    pub fn describe(self) -> &'static str {
        match self {
            Kernel::Amx => "matmuls on Intel AMX",
            Kernel::Avx512Bf16 => "matmuls with AVX-512 BF16 dot products (VDPBF16PS)",
            Kernel::Avx2 => {
                "matmuls with AVX2 on bf16 widened to f32 (no AMX or AVX-512 BF16): half the weight memory of f32, but slower than f32"
            }
            Kernel::Portable => "the portable kernel: far slower than f32 (use the f32 dtype here)",
        }
    }
}

/// True when the CPU has AVX2 and FMA (the [`Kernel::Avx2`] kernel's instructions).
pub fn avx2_usable() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True when the CPU has AMX-BF16 and the kernel lets this process use the tile
/// registers (Linux asks each process to request them: `arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`; the request is made here, once).
pub fn amx_usable() -> bool {
    static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USABLE.get_or_init(detect_amx)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect_amx() -> bool {
    // CPUID.(EAX=7, ECX=0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    if std::arch::x86_64::__cpuid(0).eax < 7 {
        return false;
    }
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain syscall with integer arguments.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    rc == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect_amx() -> bool {
    false
}

/// Blocks of C (per side) in one macro tile: 4 × 8 blocks = 128 rows × 256 columns,
/// whose A (128 × 1024 bf16) and B (1024 × 256) slices and C (128 KB) fit in L2.
const MACRO_M: usize = 4;
const MACRO_N: usize = 8;
/// k-steps (of 32) per pass over a macro tile.
const K_STEPS: usize = 32;

/// How [`gemm`] runs.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub kernel: Kernel,
    /// `C = A · B` instead of `C += A · B` (C's old values are not read).
    pub overwrite: bool,
    /// Spread macro tiles over rayon's threads (off for calls already inside a
    /// parallel loop with small products).
    pub parallel: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            kernel: Kernel::best(),
            overwrite: false,
            parallel: true,
        }
    }
}

/// `C += A · B` (or `=`, see [`Options`]): `c` holds `a.rows()` rows of `b.cols()`
/// f32, `ldc` apart.
///
/// Panics when the shapes disagree or `c` is too short.
pub fn gemm(a: &PackedA, b: &PackedB, c: &mut [f32], ldc: usize, opts: Options) {
    assert_eq!(a.k, b.k, "bf16 gemm: A has depth {}, B {}", a.k, b.k);
    let kernel = opts.kernel;
    drive(
        a,
        b.n,
        c,
        ldc,
        opts,
        |(i, j), (s0, steps), dst, ld, fresh| {
            let (ap, bp) = (a.block(i, s0), b.block(j, s0));
            // SAFETY: `drive` passes a 32×32 block of C it owns; A and B hold the steps.
            unsafe {
                match kernel {
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Amx => kernel::amx(ap, bp, steps, dst, ld, fresh),
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx512Bf16 => kernel::avx512bf16(ap, bp, steps, dst, ld, fresh),
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2 => kernel::avx2(ap, bp, steps, dst, ld, fresh),
                    _ => kernel::portable(ap, bp, steps, dst, ld, fresh),
                }
            }
        },
    );
}

/// A right operand read in place instead of packed: bf16 pairs (one `u32`, the even k
/// in the low half, as [`PackedB`] holds them), k pair `q` of column `j` at
/// `data[koff[q] + col[j]]`, where each block of 32 columns is 32 consecutive values.
/// A convolution's input stored zero-padded as channel pairs is one: the weight's k
/// runs over (kernel row, kernel column, channel), and 32 output pixels of one row
/// read 32 neighbouring input pixels (see [`super::conv`]).
pub struct PairRows<'a> {
    data: &'a [u32],
    koff: &'a [usize],
    /// `col[32 j]`: where column block `j` starts.
    block_col: Vec<usize>,
}

impl<'a> PairRows<'a> {
    /// `None` unless the columns come in whole blocks of 32 consecutive offsets.
    /// Panics when an offset reaches past `data`.
    pub fn new(data: &'a [u32], koff: &'a [usize], col: &[usize]) -> Option<Self> {
        let n = col.len();
        let whole = n.is_multiple_of(BLOCK)
            && col
                .chunks(BLOCK)
                .all(|b| b.windows(2).all(|w| w[1] == w[0] + 1));
        if !whole {
            return None;
        }
        let block_col: Vec<usize> = col.iter().step_by(BLOCK).copied().collect();
        if let (Some(k), Some(c)) = (koff.iter().max(), block_col.iter().max()) {
            assert!(
                k + c + BLOCK <= data.len(),
                "bf16 in-place operand: offset {} past its {} values",
                k + c + BLOCK,
                data.len()
            );
        }
        Some(Self {
            data,
            koff,
            block_col,
        })
    }
}

/// [`gemm`] with the right operand read in place: `C += A · B` (or `=`) with
/// `a.k` rounded up to even = twice `b`'s k pairs. Runs the [`Kernel::Avx512Bf16`]
/// kernel, the only one with an in-place variant.
///
/// Panics when the shapes disagree, `c` is too short, or the CPU has no AVX-512 BF16.
pub fn gemm_in_place(a: &PackedA, b: &PairRows, c: &mut [f32], ldc: usize, overwrite: bool) {
    assert_eq!(
        a.k.div_ceil(2),
        b.koff.len(),
        "bf16 gemm: A has depth {}, B {} pairs",
        a.k,
        b.koff.len()
    );
    let opts = Options {
        kernel: Kernel::Avx512Bf16,
        overwrite,
        parallel: true,
    };
    drive(
        a,
        b.block_col.len() * BLOCK,
        c,
        ldc,
        opts,
        |(i, j), (s0, steps), dst, ld, fresh| {
            let q0 = s0 * STEP / 2;
            let koff = &b.koff[q0..(q0 + steps * STEP / 2).min(b.koff.len())];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `drive` passes a 32×32 block of C it owns; `new` checked that every
            // pair of every block lies within `data`.
            unsafe {
                let bp = b.data.as_ptr().add(b.block_col[j]);
                kernel::avx512bf16_in_place(a.block(i, s0), bp, koff, dst, ld, fresh)
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (i, j, koff, dst, ld, fresh);
        },
    );
}

/// The blocked driver shared by [`gemm`] and [`gemm_in_place`]: checks C, then runs
/// `block((i, j), (s0, steps), dst, ld, fresh)` for every 32×32 block of C (edge
/// blocks through a scratch block) and every pass of [`K_STEPS`] k-steps, macro tile
/// by macro tile over rayon's threads.
fn drive<F>(a: &PackedA, n: usize, c: &mut [f32], ldc: usize, opts: Options, block: F)
where
    F: Fn((usize, usize), (usize, usize), *mut f32, usize, bool) + Sync,
{
    let m = a.m;
    assert!(ldc >= n, "bf16 gemm: ldc {ldc} < n {n}");
    assert!(
        m == 0 || c.len() >= (m - 1) * ldc + n,
        "bf16 gemm: C too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    if a.steps == 0 {
        if opts.overwrite {
            for row in c.chunks_mut(ldc).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    assert!(
        opts.kernel.usable(),
        "bf16 gemm: the {} kernel can't run on this CPU",
        opts.kernel.name()
    );
    let (mb, nb) = (m.div_ceil(BLOCK), n.div_ceil(BLOCK));
    let (mt, nt) = (mb.div_ceil(MACRO_M), nb.div_ceil(MACRO_N));
    // Macro tiles write disjoint blocks of C.
    let c = SendPtr(c.as_mut_ptr());
    let run = |t: usize| {
        let (ti, tj) = (t / nt, t % nt);
        let blocks_m = ti * MACRO_M..((ti + 1) * MACRO_M).min(mb);
        let blocks_n = tj * MACRO_N..((tj + 1) * MACRO_N).min(nb);
        let mut scratch = [0f32; BLOCK * BLOCK];
        for s0 in (0..a.steps).step_by(K_STEPS) {
            let steps = K_STEPS.min(a.steps - s0);
            let fresh = opts.overwrite && s0 == 0;
            for j in blocks_n.clone() {
                for i in blocks_m.clone() {
                    let rows = BLOCK.min(m - i * BLOCK);
                    let cols = BLOCK.min(n - j * BLOCK);
                    // SAFETY: block (i, j) of C lies within the `m × n` area checked
                    // above and belongs to this macro tile alone.
                    let cb = unsafe { c.get().add(i * BLOCK * ldc + j * BLOCK) };
                    let ij = (i, j);
                    if rows == BLOCK && cols == BLOCK {
                        block(ij, (s0, steps), cb, ldc, fresh);
                    } else {
                        let call = |dst, ld| block(ij, (s0, steps), dst, ld, fresh);
                        unsafe { via_scratch(cb, ldc, (rows, cols), fresh, &mut scratch, call) };
                    }
                }
            }
        }
    };
    let tiles = mt * nt;
    if opts.parallel && tiles > 1 && rayon::current_num_threads() > 1 {
        (0..tiles).into_par_iter().for_each(run);
    } else {
        (0..tiles).for_each(run);
    }
}

/// Runs a kernel call on an edge block of C (`rows × cols` at `cb`) through the full
/// 32×32 `scratch`: copies C in (unless `fresh`), lets `call` work on the scratch,
/// copies the block's part back.
///
/// # Safety
/// `rows × cols` values `ldc` apart at `cb` are valid and touched by no other thread.
unsafe fn via_scratch(
    cb: *mut f32,
    ldc: usize,
    (rows, cols): (usize, usize),
    fresh: bool,
    scratch: &mut [f32; BLOCK * BLOCK],
    call: impl FnOnce(*mut f32, usize),
) {
    scratch.fill(0.0);
    for r in (0..rows).filter(|_| !fresh) {
        unsafe {
            std::ptr::copy_nonoverlapping(cb.add(r * ldc), scratch[r * BLOCK..].as_mut_ptr(), cols)
        };
    }
    call(scratch.as_mut_ptr(), BLOCK);
    for r in 0..rows {
        unsafe {
            std::ptr::copy_nonoverlapping(scratch[r * BLOCK..].as_ptr(), cb.add(r * ldc), cols)
        };
    }
}

#[cfg(test)]
mod tests;
