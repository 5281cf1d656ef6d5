//! Packed bf16 operands of [`super::gemm`], in the tile layouts AMX loads directly.
//!
//! Both operands are cut into blocks of 32 rows (A) or 32 columns (B) and steps of 32
//! along k (zero-padded at the ends); each (block, step) is [`STEP_ELEMS`] contiguous
//! values, two 1 KB tiles:
//! - A: tile `t` holds rows `16t..16t+16`, each row 32 consecutive k;
//! - B: tile `t` holds columns `16t..16t+16`; its row `r` holds, for each column, the
//!   pair `(k = 2r, k = 2r + 1)` side by side (Intel's "VNNI" layout for `TDPBF16PS`).
//!
//! f32 → bf16 rounds to nearest even, as PyTorch's `.to(torch.bfloat16)` does.

use rayon::prelude::*;

/// Rows (A) or columns (B) per block.
pub const BLOCK: usize = 32;
/// k per step.
pub const STEP: usize = 32;
/// bf16 values in one (block, step).
pub const STEP_ELEMS: usize = BLOCK * STEP;

/// f32 → bf16 bits, rounding to nearest even (NaN stays NaN).
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Whether this CPU has AVX-512 BF16 (with AVX-512 BW), which packing uses to round
/// and the [`super::Kernel::Avx512Bf16`] kernel to multiply.
pub fn avx512bf16_usable() -> bool {
    simd::usable()
}

/// `dst[i]` = the bf16 pair of `lo[i]` (low half) and `hi[i]`, rounded to nearest even
/// as [`to_bf16`]: what [`super::PairRows`] holds.
pub fn to_pairs(lo: &[f32], hi: &[f32], dst: &mut [u32]) {
    let n = dst.len();
    assert!(lo.len() >= n && hi.len() >= n, "to_pairs: {n} pairs asked");
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if simd::usable() {
        while i + 16 <= n {
            // SAFETY: 16 values each side from `i`; the CPU has the features.
            unsafe { simd::pairs16(lo[i..].as_ptr(), hi[i..].as_ptr(), dst[i..].as_mut_ptr()) };
            i += 16;
        }
    }
    for j in i..n {
        dst[j] = pair(lo[j], hi[j]);
    }
}

/// Two f32 → one u32 holding their bf16 values, `lo` in the low half (what one
/// B-tile element pair is).
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    ((to_bf16(hi) as u32) << 16) | to_bf16(lo) as u32
}

/// Blocks of B packed by one task.
const GROUP: usize = 8;

fn steps_for(k: usize) -> usize {
    k.div_ceil(STEP)
}

/// Writes `row` as row `i` of one packed block of A (`out`: all its steps).
fn pack_row(row: &[f32], out: &mut [u16], i: usize) {
    #[cfg(target_arch = "x86_64")]
    if simd::usable() {
        // SAFETY: the CPU has the features.
        return unsafe { simd::pack_row(row, out, i) };
    }
    pack_row_body(row, out, i, |chunk, dst| {
        for (d, &x) in dst.iter_mut().zip(chunk) {
            *d = to_bf16(x);
        }
    })
}

/// [`pack_row`]'s loop; `convert` rounds one chunk of up to 32 values.
#[inline(always)]
fn pack_row_body(row: &[f32], out: &mut [u16], i: usize, convert: impl Fn(&[f32], &mut [u16])) {
    for (s, chunk) in row.chunks(STEP).enumerate() {
        convert(chunk, &mut out[s * STEP_ELEMS + i * STEP..][..chunk.len()]);
    }
}

/// The left operand (`m × k`), packed.
#[derive(Debug, Clone)]
pub struct PackedA {
    pub(super) m: usize,
    pub(super) k: usize,
    pub(super) steps: usize,
    pub(super) data: Buf,
}

impl PackedA {
    /// An all-zero `m × k` operand, to be filled by [`Self::fill_rows`] or
    /// [`Self::write_row`] (and refilled: the zero padding is never written).
    pub fn zeroed(m: usize, k: usize) -> Self {
        let steps = steps_for(k);
        let data = Buf::zeroed(m.div_ceil(BLOCK) * steps * STEP_ELEMS);
        Self { m, k, steps, data }
    }

    /// Packs `m` rows of `k` f32, row `i` at `src[i * row_stride..]`.
    pub fn from_rows(src: &[f32], m: usize, k: usize, row_stride: usize) -> Self {
        let mut a = Self::zeroed(m, k);
        a.fill_rows(src, row_stride, m * k >= 1 << 16);
        a
    }

    /// Overwrites every row, row `i` from `src[i * row_stride..]`; `parallel` spreads
    /// the work over rayon's threads.
    pub fn fill_rows(&mut self, src: &[f32], row_stride: usize, parallel: bool) {
        let (m, k, steps) = (self.m, self.k, self.steps);
        assert!(
            m == 0 || src.len() >= (m - 1) * row_stride + k,
            "A: source too short"
        );
        let pack_block = |(blk, out): (usize, &mut [u16])| {
            for i in 0..BLOCK.min(m - blk * BLOCK) {
                let row = &src[(blk * BLOCK + i) * row_stride..][..k];
                pack_row(row, out, i);
            }
        };
        let block_len = steps * STEP_ELEMS;
        let halves = self.data.halves();
        if parallel {
            halves
                .par_chunks_mut(block_len)
                .enumerate()
                .for_each(pack_block);
        } else {
            halves
                .chunks_mut(block_len)
                .enumerate()
                .for_each(pack_block);
        }
    }

    /// Overwrites row `i` with `row` (`k` values).
    pub fn write_row(&mut self, i: usize, row: &[f32]) {
        assert!(
            i < self.m && row.len() == self.k,
            "A: row {i} of {} values",
            row.len()
        );
        let block_len = self.steps * STEP_ELEMS;
        let blk = i / BLOCK;
        let out = &mut self.data.halves()[blk * block_len..][..block_len];
        pack_row(row, out, i % BLOCK);
    }

    pub fn rows(&self) -> usize {
        self.m
    }

    /// The packed values of block `blk` from step `step` on.
    pub(super) fn block(&self, blk: usize, step: usize) -> *const u16 {
        self.data.ptr((blk * self.steps + step) * STEP_ELEMS)
    }
}

/// The right operand (`k × n`), packed.
#[derive(Debug, Clone)]
pub struct PackedB {
    pub(super) k: usize,
    pub(super) n: usize,
    pub(super) steps: usize,
    pub(super) data: Buf,
}

impl PackedB {
    /// An all-zero operand of depth `k` with room for `n` columns, for
    /// [`Self::refill_gather`].
    pub fn with_capacity(k: usize, n: usize) -> Self {
        let steps = steps_for(k);
        let data = Buf::zeroed(n.div_ceil(BLOCK) * steps * STEP_ELEMS);
        Self { k, n, steps, data }
    }

    /// Packs `B[kk][j] = src[kk * row_stride + j]` (`k` rows of `n` f32: channels ×
    /// pixels).
    pub fn from_rows(src: &[f32], k: usize, n: usize, row_stride: usize) -> Self {
        let koff: Vec<usize> = (0..k).map(|kk| kk * row_stride).collect();
        let poff: Vec<usize> = (0..n).collect();
        Self::from_gather(src, &koff, &poff)
    }

    /// Packs `B[kk][j] = src[j * col_stride + kk]`: the transpose of `n` rows of `k`
    /// f32, as a linear layer's `[out, in]` weight is stored.
    pub fn from_cols(src: &[f32], k: usize, n: usize, col_stride: usize) -> Self {
        let koff: Vec<usize> = (0..k).collect();
        let poff: Vec<usize> = (0..n).map(|j| j * col_stride).collect();
        Self::from_gather(src, &koff, &poff)
    }

    /// Packs `B[kk][j] = src[koff[kk] + poff[j]]` (`k = koff.len()`, `n = poff.len()`).
    /// An unfolded convolution input is this with `koff` the offset of each (channel,
    /// kernel row, kernel column) and `poff` that of each output pixel in a padded input:
    /// packing unfolds it on the way, with no f32 copy. Runs of 16 columns whose
    /// offsets are consecutive are read as slices.
    ///
    /// Panics when an offset reaches past `src`.
    pub fn from_gather(src: &[f32], koff: &[usize], poff: &[usize]) -> Self {
        let mut b = Self::with_capacity(koff.len(), poff.len());
        b.refill_gather(src, koff, poff);
        b
    }

    /// [`Self::from_gather`] into this operand's storage (`koff.len()` must be its
    /// depth, `poff.len()` at most the columns it was made for): the columns become
    /// `poff.len()`. Values left in padding columns of the last block only reach
    /// columns of C past the new width, which are never written.
    pub fn refill_gather(&mut self, src: &[f32], koff: &[usize], poff: &[usize]) {
        let (k, n) = (koff.len(), poff.len());
        assert_eq!(k, self.k, "B: refilled with depth {k}, made for {}", self.k);
        let capacity = self
            .data
            .bytes()
            .checked_div(self.steps * STEP_ELEMS * 2)
            .map_or(usize::MAX, |blocks| blocks * BLOCK);
        assert!(n <= capacity, "B: {n} columns, room for {capacity}");
        self.n = n;
        let b = self;
        if k == 0 || n == 0 {
            return;
        }
        let reach = koff.iter().max().unwrap() + poff.iter().max().unwrap();
        assert!(
            reach < src.len(),
            "B: offset {reach} past the source ({})",
            src.len()
        );
        let words_per_block = b.steps * STEP_ELEMS / 2;
        #[cfg(target_arch = "x86_64")]
        let simd = simd::usable();
        // Each task packs GROUP blocks, k pair by k pair: one pass reads GROUP·32
        // neighbouring columns of two rows of B (whole cache lines and pages).
        let pack_group = |(g, out): (usize, &mut [u32])| {
            let j0 = g * GROUP * BLOCK;
            let cols = (GROUP * BLOCK).min(n - j0);
            // Per 16-column tile: its column offsets, and whether they are consecutive.
            let tiles: Vec<(&[usize], bool)> = poff[j0..j0 + cols]
                .chunks(16)
                .map(|tp| {
                    (
                        tp,
                        tp.len() == 16 && tp.windows(2).all(|w| w[1] == w[0] + 1),
                    )
                })
                .collect();
            for kk in (0..k).step_by(2) {
                let (s, r) = (kk / STEP, (kk % STEP) / 2);
                let (klo, khi) = (koff[kk], koff.get(kk + 1).copied());
                for (t, &(tp, run)) in tiles.iter().enumerate() {
                    let at =
                        (t / 2) * words_per_block + s * STEP_ELEMS / 2 + (t % 2) * 256 + r * 16;
                    let dst = &mut out[at..][..tp.len()];
                    match (run, khi) {
                        #[cfg(target_arch = "x86_64")]
                        (true, Some(khi)) if simd => {
                            let lo = &src[klo + tp[0]..][..16];
                            let hi = &src[khi + tp[0]..][..16];
                            // SAFETY: 16 values each; the CPU has the features.
                            unsafe { simd::pairs16(lo.as_ptr(), hi.as_ptr(), dst.as_mut_ptr()) };
                        }
                        (true, Some(khi)) => {
                            let lo = &src[klo + tp[0]..][..16];
                            let hi = &src[khi + tp[0]..][..16];
                            for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
                                *d = pair(l, h);
                            }
                        }
                        _ => {
                            for (d, &p) in dst.iter_mut().zip(tp) {
                                let hi = khi.map_or(0.0, |khi| src[khi + p]);
                                *d = pair(src[klo + p], hi);
                            }
                        }
                    }
                }
            }
        };
        let words = &mut b.data.words()[..n.div_ceil(BLOCK) * words_per_block];
        let group_words = GROUP * words_per_block;
        if k * n >= 1 << 15 {
            words
                .par_chunks_mut(group_words)
                .enumerate()
                .for_each(pack_group);
        } else {
            words
                .chunks_mut(group_words)
                .enumerate()
                .for_each(pack_group);
        }
    }

    pub fn depth(&self) -> usize {
        self.k
    }

    pub fn cols(&self) -> usize {
        self.n
    }

    pub(super) fn block(&self, blk: usize, step: usize) -> *const u16 {
        self.data.ptr((blk * self.steps + step) * STEP_ELEMS)
    }
}

/// Zeroed packed storage starting on a 64-byte (cache line) boundary, so that every
/// 64-byte tile row is one cache line.
#[derive(Debug, Clone)]
pub(super) struct Buf {
    raw: Vec<u32>,
    start: usize,
    len: usize,
}

impl Buf {
    /// Room for `len` bf16 values (`len` even).
    fn zeroed(len: usize) -> Self {
        let words = len / 2;
        let raw = vec![0u32; words + 16];
        let start = raw.as_ptr().align_offset(64).min(16);
        Self {
            raw,
            start,
            len: words,
        }
    }

    fn words(&mut self) -> &mut [u32] {
        &mut self.raw[self.start..self.start + self.len]
    }

    fn halves(&mut self) -> &mut [u16] {
        let w = self.words();
        // SAFETY: u16 has no invalid values and a smaller alignment than u32.
        unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr().cast::<u16>(), w.len() * 2) }
    }

    fn ptr(&self, at: usize) -> *const u16 {
        assert!(at <= self.len * 2, "packed offset out of range");
        // SAFETY: `at` is within the buffer (checked).
        unsafe { self.raw.as_ptr().add(self.start).cast::<u16>().add(at) }
    }

    fn bytes(&self) -> usize {
        self.len * 4
    }
}

/// AVX-512 BF16 conversions (`VCVTNE2PS2BF16`: round to nearest even, as [`to_bf16`],
/// except that f32 denormals become zero).
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// Whether this CPU has AVX-512 BF16 (every AMX CPU does).
    pub fn usable() -> bool {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512bw")
        })
    }

    /// `dst[i] = pair(lo[i], hi[i])` for 16 values.
    ///
    /// # Safety
    /// 16 values readable at `lo`, `hi`, writable at `dst`; [`usable`] is true.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn pairs16(lo: *const f32, hi: *const f32, dst: *mut u32) {
        // Lanes 0-15 hold lo's bf16, 16-31 hi's; interleave them into (lo_i, hi_i).
        let idx = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        unsafe {
            let both = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(hi), _mm512_loadu_ps(lo));
            let both = std::mem::transmute::<__m512bh, __m512i>(both);
            _mm512_storeu_si512(dst.cast(), _mm512_permutexvar_epi16(idx, both));
        }
    }

    /// [`super::pack_row`] with whole chunks of 32 converted by [`halves32`].
    ///
    /// # Safety
    /// [`usable`] is true.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn pack_row(row: &[f32], out: &mut [u16], i: usize) {
        super::pack_row_body(row, out, i, |chunk, dst| {
            if chunk.len() == 32 {
                // SAFETY: 32 values each side; the CPU has the features.
                unsafe { halves32(chunk.as_ptr(), dst.as_mut_ptr()) };
            } else {
                for (d, &x) in dst.iter_mut().zip(chunk) {
                    *d = super::to_bf16(x);
                }
            }
        })
    }

    /// 32 f32 → 32 bf16, in order.
    ///
    /// # Safety
    /// 32 values readable at `src`, writable at `dst`; [`usable`] is true.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn halves32(src: *const f32, dst: *mut u16) {
        unsafe {
            let v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src.add(16)), _mm512_loadu_ps(src));
            _mm512_storeu_si512(dst.cast(), std::mem::transmute::<__m512bh, __m512i>(v));
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    pub fn usable() -> bool {
        false
    }
}
