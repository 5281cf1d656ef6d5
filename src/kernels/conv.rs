//! 2-D convolution (PyTorch `nn.Conv2d` semantics, NCHW) that runs at matrix
//! multiply speed on the CPU.
//!
//! candle 0.11's CPU conv2d unfolds the whole input (im2col) before one big
//! matmul: at 512 px that buffer is 0.6-1.2 GB for the VAE's convolutions, and
//! the convolution runs well below a matmul of the same size (benches/README.md,
//! "Figures behind constants in the code"). Here the unfolding is done
//! one tile of output rows at a time (a few MB, cache-resident), each tile
//! multiplied by the weights with the `gemm` crate straight into the output,
//! bias pre-loaded; 1x1 convolutions multiply the input in place. Tiles run on
//! all cores. In mixed precision (CPU and the `bf16` dtype)
//! the weight is packed once in bf16 and each tile of output pixels is unfolded
//! straight into a packed bf16 operand of [`super::bf16::gemm`]. Other devices and
//! dtypes use candle's conv2d unchanged.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape};
use candle_nn::Conv2dConfig;
use rayon::prelude::*;

use super::bf16::{Kernel, Options, PackedA, PackedB, PairRows, gemm, gemm_in_place, to_pairs};
use super::{SendPtr, contiguous_f32};

/// Target size of one unfolded tile (bytes).
const TILE_BYTES: usize = 2 << 20;

/// Target size of one packed bf16 tile of unfolded input (bytes): the weights are
/// read once per tile, so tiles are larger than the f32 path's.
const BF16_TILE_BYTES: usize = 8 << 20;

/// The CPU kernel's settings; the weight `[c_out, c_in, kh, kw]` is its second
/// operand (read in place, never copied).
#[derive(Debug, Clone)]
pub struct CpuConv {
    bias: Option<std::sync::Arc<Vec<f32>>>,
    c_out: usize,
    c_in: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
}

impl CpuConv {
    /// The CPU kernel for `candle`'s layer, `None` when it cannot run it.
    pub fn new(candle: &candle_nn::Conv2d, cfg: Conv2dConfig) -> Result<Option<Self>> {
        let w = candle.weight();
        let usable = w.device().is_cpu()
            && w.dtype() == DType::F32
            && cfg.groups == 1
            && cfg.dilation == 1
            && cfg.stride > 0;
        Ok(if usable {
            let (c_out, c_in, kh, kw) = w.dims4()?;
            Some(Self {
                bias: match candle.bias() {
                    Some(b) => Some(std::sync::Arc::new(b.to_vec1::<f32>()?)),
                    None => None,
                },
                c_out,
                c_in,
                kh,
                kw,
                stride: cfg.stride,
                padding: cfg.padding,
            })
        } else {
            None
        })
    }
}

impl CpuConv {
    /// `b` images of `c_out` planes of `hw` values, each plane its channel's bias
    /// (0 without one), written once.
    fn bias_planes(&self, b: usize, hw: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(b * self.c_out * hw);
        for _ in 0..b {
            for co in 0..self.c_out {
                let v = self.bias.as_ref().map_or(0.0, |bias| bias[co]);
                out.resize(out.len() + hw, v);
            }
        }
        out
    }

    fn out_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let ho = (h + 2 * self.padding).checked_sub(self.kh);
        let wo = (w + 2 * self.padding).checked_sub(self.kw);
        match (ho, wo) {
            (Some(ho), Some(wo)) => Ok((ho / self.stride + 1, wo / self.stride + 1)),
            _ => candle_core::bail!("conv2d: input {h}x{w} is smaller than the kernel"),
        }
    }

    /// Unfolds output rows `oy0..oy0 + rows` of one image `x` `[c_in, h, w]`
    /// into `col` `[c_in * kh * kw, rows * wo]`.
    #[allow(clippy::too_many_arguments)]
    fn unfold(
        &self,
        x: &[f32],
        h: usize,
        w: usize,
        wo: usize,
        oy0: usize,
        rows: usize,
        col: &mut [f32],
    ) {
        let n = rows * wo;
        let (s, p) = (self.stride, self.padding as isize);
        for ci in 0..self.c_in {
            let plane = &x[ci * h * w..(ci + 1) * h * w];
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let r = (ci * self.kh + ky) * self.kw + kx;
                    let dst = &mut col[r * n..(r + 1) * n];
                    for oy in 0..rows {
                        let iy = ((oy0 + oy) * s) as isize + ky as isize - p;
                        let out = &mut dst[oy * wo..(oy + 1) * wo];
                        if iy < 0 || iy >= h as isize {
                            out.fill(0.0);
                            continue;
                        }
                        let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                        let shift = kx as isize - p;
                        if s == 1 {
                            // Output x maps to input x + shift: one copy, zero edges.
                            let lo = (-shift).clamp(0, wo as isize) as usize;
                            let hi = (w as isize - shift).clamp(lo as isize, wo as isize) as usize;
                            out[..lo].fill(0.0);
                            out[lo..hi].copy_from_slice(
                                &src[(lo as isize + shift) as usize
                                    ..(hi as isize + shift) as usize],
                            );
                            out[hi..].fill(0.0);
                        } else {
                            for (ox, o) in out.iter_mut().enumerate() {
                                let ix = (ox * s) as isize + shift;
                                *o = if ix < 0 || ix >= w as isize {
                                    0.0
                                } else {
                                    src[ix as usize]
                                };
                            }
                        }
                    }
                }
            }
        }
    }

    /// `dst[c_out, n]` (row stride `dst_rs`) += weight `[c_out, k]` · `rhs[k, n]`.
    ///
    /// # Safety
    /// `dst` must be valid for `c_out` rows of `n` values `dst_rs` apart, and
    /// `rhs` for `k * n` values; no other thread may touch those values.
    #[allow(clippy::too_many_arguments)]
    unsafe fn multiply(
        &self,
        weight: &[f32],
        dst: *mut f32,
        dst_rs: usize,
        rhs: &[f32],
        n: usize,
        threads: usize,
    ) {
        let k = self.c_in * self.kh * self.kw;
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: shapes and strides as documented; gemm reads lhs/rhs, writes dst.
        unsafe {
            gemm::gemm(
                self.c_out,
                n,
                k,
                dst,
                1,
                dst_rs as isize,
                true,
                weight.as_ptr(),
                1,
                k as isize,
                rhs.as_ptr(),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        }
    }
}

impl CustomOp2 for CpuConv {
    fn name(&self) -> &'static str {
        "sdserve-conv2d"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        w_storage: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "conv2d", "input")?;
        let weight = contiguous_f32(w_storage, w_layout, "conv2d", "weight")?;
        if w_layout.shape().dims() != [self.c_out, self.c_in, self.kh, self.kw] {
            candle_core::bail!("conv2d: weight shape {:?} changed", w_layout.shape());
        }
        let (b, c, h, w) = layout.shape().dims4()?;
        if c != self.c_in {
            candle_core::bail!(
                "conv2d: input has {c} channels, the weight expects {}",
                self.c_in
            );
        }
        let (ho, wo) = self.out_size(h, w)?;
        let hw_out = ho * wo;
        // Start from the bias: the products are accumulated onto it.
        let mut out = self.bias_planes(b, hw_out);
        let threads = candle_core::utils::get_num_threads();
        let k = self.c_in * self.kh * self.kw;
        let pointwise = self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0;
        let out_ptr = SendPtr(out.as_mut_ptr());
        for bi in 0..b {
            let xb = &x[bi * c * h * w..(bi + 1) * c * h * w];
            let ob = SendPtr(unsafe { out_ptr.0.add(bi * self.c_out * hw_out) });
            if pointwise {
                // SAFETY: xb is [c_in, hw]; ob is this image's [c_out, hw] block.
                unsafe { self.multiply(weight, ob.0, hw_out, xb, hw_out, threads) };
                continue;
            }
            let rows = (TILE_BYTES / (4 * k * wo)).clamp(1, ho);
            let tiles: Vec<usize> = (0..ho).step_by(rows).collect();
            let run = |oy0: usize, gemm_threads: usize| {
                let rows = rows.min(ho - oy0);
                let mut col = vec![0f32; k * rows * wo];
                self.unfold(xb, h, w, wo, oy0, rows, &mut col);
                // SAFETY: tile `oy0` owns output columns oy0*wo..(oy0+rows)*wo of
                // every channel row; tiles never overlap.
                unsafe {
                    self.multiply(
                        weight,
                        ob.get().add(oy0 * wo),
                        hw_out,
                        &col,
                        rows * wo,
                        gemm_threads,
                    )
                };
            };
            if tiles.len() >= 2 * threads && threads > 1 {
                tiles.par_iter().for_each(|&oy0| run(oy0, 1));
            } else {
                tiles.iter().for_each(|&oy0| run(oy0, threads));
            }
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from_dims(&[b, self.c_out, ho, wo]),
        ))
    }
}

/// A convolution with its weight packed in bf16 (`[c_out, kh·kw·c_in]` as the left
/// operand: k runs over kernel row, kernel column, then channel), run on f32
/// activations, per image:
///
/// - **in place** ([`Bf16Conv::reads_in_place`]: the AVX-512 BF16 kernel, stride 1, an
///   even channel count, output rows a multiple of 32 wide): the input is stored once
///   zero-padded as bf16 channel pairs, `[c_in/2][h + 2p][w + 2p]`. Then k pair (ky,
///   kx, channels 2c and 2c + 1) of output pixel (y, x) is the pair at (c, y + ky,
///   x + kx), and 32 output pixels of a row are 32 neighbouring pairs: the kernel reads
///   them where they are ([`super::bf16::PairRows`]), with no unfolded copy;
/// - **otherwise** the input is zero-padded once, then each tile of output pixels is
///   unfolded into a packed bf16 right operand.
///
/// Both multiply into the output pre-loaded with the bias, with the same products
/// summed in the same order.
#[derive(Debug, Clone)]
pub struct Bf16Conv {
    geom: CpuConv,
    weight: std::sync::Arc<PackedA>,
}

impl Bf16Conv {
    /// `candle`'s f32 weight packed in bf16, `None` when the CPU kernel can't
    /// run this layer's geometry.
    pub fn pack(candle: &candle_nn::Conv2d, cfg: Conv2dConfig) -> Result<Option<Self>> {
        let Some(geom) = CpuConv::new(candle, cfg)? else {
            return Ok(None);
        };
        let k = geom.c_in * geom.kh * geom.kw;
        // k runs over (kernel row, kernel column, channel): see [`Bf16Conv`].
        let w = candle.weight().permute((0, 2, 3, 1))?;
        let w = w.flatten_all()?.to_vec1::<f32>()?;
        Ok(Some(Self {
            weight: std::sync::Arc::new(PackedA::from_rows(&w, geom.c_out, k, k)),
            geom,
        }))
    }
}

impl CustomOp1 for Bf16Conv {
    fn name(&self) -> &'static str {
        "sdserve-bf16-conv2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(storage, layout, true)
    }
}

impl CpuConv {
    /// Where each (kernel row, kernel column, plane) of a window lies in a padded input
    /// of `planes` planes `plane` values apart, rows `wp` wide: the k order of
    /// [`Bf16Conv`]'s weight.
    fn window_offsets(&self, planes: usize, plane: usize, wp: usize) -> Vec<usize> {
        let mut koff = Vec::with_capacity(self.kh * self.kw * planes);
        for ky in 0..self.kh {
            for kx in 0..self.kw {
                koff.extend((0..planes).map(|ci| ci * plane + ky * wp + kx));
            }
        }
        koff
    }
}

impl Bf16Conv {
    /// Whether [`Self::run`] reads the input in place for an output `wo` wide.
    fn reads_in_place(&self, wo: usize) -> bool {
        let g = &self.geom;
        Kernel::best() == Kernel::Avx512Bf16
            && g.stride == 1
            && g.c_in.is_multiple_of(2)
            && wo.is_multiple_of(32)
    }

    /// The convolution; `in_place: false` always unfolds (for tests).
    fn run(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
        in_place: bool,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.geom;
        let x = contiguous_f32(storage, layout, "conv2d", "input")?;
        let (b, c, h, w) = layout.shape().dims4()?;
        if c != g.c_in {
            candle_core::bail!(
                "conv2d: input has {c} channels, the weight expects {}",
                g.c_in
            );
        }
        if h * w == 0 || g.c_in == 0 {
            candle_core::bail!("conv2d: empty input {:?}", layout.shape());
        }
        let (ho, wo) = g.out_size(h, w)?;
        let hw_out = ho * wo;
        // Start from the bias: the products are accumulated onto it.
        let mut out = g.bias_planes(b, hw_out);
        let p = g.padding;
        let (hp, wp) = (h + 2 * p, w + 2 * p);
        // Where each output pixel's window starts in the padded input.
        let poff: Vec<usize> = (0..hw_out)
            .map(|i| (i / wo) * g.stride * wp + (i % wo) * g.stride)
            .collect();
        let images = x.chunks(c * h * w).zip(out.chunks_mut(g.c_out * hw_out));
        if in_place && self.reads_in_place(wo) {
            let plane = hp * wp;
            // Offset of each k pair (kernel row, kernel column, channel pair).
            let koff = g.window_offsets(c / 2, plane, wp);
            // The borders are never written: they stay zero for every image.
            let mut pairs = vec![0u32; c / 2 * plane];
            for (xb, ob) in images {
                pairs
                    .par_chunks_mut(plane)
                    .zip(xb.par_chunks(2 * h * w))
                    .for_each(|(dst, src)| {
                        let (lo, hi) = src.split_at(h * w);
                        for y in 0..h {
                            let row = y * w..(y + 1) * w;
                            let at = &mut dst[(y + p) * wp + p..][..w];
                            to_pairs(&lo[row.clone()], &hi[row], at);
                        }
                    });
                let rhs = PairRows::new(&pairs, &koff, &poff)
                    .expect("stride 1 and rows a multiple of 32 wide: whole column blocks");
                gemm_in_place(&self.weight, &rhs, ob, hw_out, false);
            }
        } else {
            // Offset of each unfolded row (kernel row, kernel column, channel).
            let koff = g.window_offsets(c, hp * wp, wp);
            let tile = (BF16_TILE_BYTES / (2 * koff.len()))
                .next_multiple_of(32)
                .max(256)
                .min(hw_out);
            let mut padded = if p > 0 {
                vec![0f32; c * hp * wp]
            } else {
                Vec::new()
            };
            let mut rhs = PackedB::with_capacity(koff.len(), tile);
            for (xb, ob) in images {
                let src: &[f32] = if p > 0 {
                    for (dst, plane) in padded.chunks_mut(hp * wp).zip(xb.chunks(h * w)) {
                        for (y, row) in plane.chunks(w).enumerate() {
                            dst[(y + p) * wp + p..][..w].copy_from_slice(row);
                        }
                    }
                    &padded
                } else {
                    xb
                };
                for p0 in (0..hw_out).step_by(tile) {
                    let cols = &poff[p0..(p0 + tile).min(hw_out)];
                    rhs.refill_gather(src, &koff, cols);
                    gemm(
                        &self.weight,
                        &rhs,
                        &mut ob[p0..],
                        hw_out,
                        Options::default(),
                    );
                }
            }
        }
        Ok((
            CpuStorage::F32(out),
            Shape::from_dims(&[b, g.c_out, ho, wo]),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{self, max_rel_diff};
    use candle_core::{Device, Module, Tensor};

    fn fixed(dims: &[usize], salt: f32) -> Tensor {
        test_util::fixed(dims, salt, 2.0, -1.0)
    }

    #[test]
    fn bf16_in_place_equals_unfolded() {
        if Kernel::best() != Kernel::Avx512Bf16 {
            eprintln!(
                "SKIPPED bf16_in_place_equals_unfolded: this CPU's bf16 kernel is {:?}, not \
                 avx512bf16, so the in-place path is not run",
                Kernel::best()
            );
            return;
        }
        // (batch, c_in, c_out, h, w, kernel, padding): rows 32, 64 and 96 wide; a
        // partial k-step (4 channels), several k passes (130 channels), an edge
        // block of C (33 outputs), a 1x1 and an unpadded convolution.
        let cases = [
            (2, 32, 48, 6, 32, 3, 1),
            (1, 4, 40, 5, 64, 3, 1),
            (2, 130, 33, 3, 32, 3, 1),
            (1, 64, 32, 3, 96, 1, 0),
            (1, 6, 8, 4, 34, 3, 0),
        ];
        for (b, ci, co, h, w, k, p) in cases {
            let x = fixed(&[b, ci, h, w], 0.6);
            let cfg = Conv2dConfig {
                padding: p,
                ..Default::default()
            };
            let candle =
                candle_nn::Conv2d::new(fixed(&[co, ci, k, k], 0.7), Some(fixed(&[co], 0.8)), cfg);
            let want = candle.forward(&x).unwrap();
            let op = Bf16Conv::pack(&candle, cfg)
                .unwrap()
                .expect("packed in bf16");
            let wo = want.dim(3).unwrap();
            assert!(
                op.reads_in_place(wo),
                "case {ci}x{h}x{w} k{k}: not in place"
            );
            let (storage, layout) = x.storage_and_layout();
            let candle_core::Storage::Cpu(storage) = &*storage else {
                panic!("not on the CPU");
            };
            let run = |in_place| match op.run(storage, layout, in_place).unwrap().0 {
                CpuStorage::F32(v) => v,
                _ => panic!("not f32"),
            };
            let (fast, unfolded) = (run(true), run(false));
            assert_eq!(fast, unfolded, "case {ci}x{h}x{w} k{k} p{p}");
            let got = Tensor::from_vec(fast, want.shape(), &Device::Cpu).unwrap();
            let d = max_rel_diff(&got, &want);
            assert!(d < 1e-2 && d > 0.0, "case {ci}x{h}x{w} k{k}: {d}");
        }
    }
}
