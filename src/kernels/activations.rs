//! GEGLU's gate (Shazeer 2020, "GLU Variants Improve Transformer"), as diffusers'
//! `models/activations.py` `GEGLU.forward` computes it after its projection:
//! `hidden, gate = proj(x).chunk(2, dim=-1); hidden * F.gelu(gate)` with the exact erf
//! GELU. Used by the CPU's mixed precision, where the projection is one bf16 matmul
//! with both halves side by side: one pass reads them and writes the product (candle's
//! path is a scalar `erff` per value plus a separate multiply).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous_f32;
use super::math::gelu;

/// `x[.., :n] * gelu(x[.., n:])` for `x: [.., 2n]` (f32, CPU).
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Geglu)
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "sdserve-geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "geglu", "input")?;
        let dims = layout.shape().dims();
        let width = dims.last().copied().unwrap_or(0);
        if width == 0 || !width.is_multiple_of(2) {
            candle_core::bail!("geglu: last dimension {width} is not even");
        }
        let n = width / 2;
        let mut out = vec![0f32; x.len() / 2];
        out.par_chunks_mut(n)
            .zip(x.par_chunks(width))
            .for_each(|(o, row)| gate(o, row));
        let mut shape = dims.to_vec();
        *shape.last_mut().unwrap() = n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

simd_dispatch! {
    /// One row: `o = row[..n] * gelu(row[n..])`, vectorised where the CPU allows.
    fn gate(o: &mut [f32], row: &[f32]) => gate_body
}

#[inline(always)]
fn gate_body(o: &mut [f32], row: &[f32]) {
    let (value, g) = row.split_at(o.len());
    for ((o, &v), &g) in o.iter_mut().zip(value).zip(g) {
        *o = v * gelu(g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn geglu_matches_candle() {
        let x = Tensor::randn(0f32, 2.0, (3, 5, 2 * 37), &Device::Cpu).unwrap();
        let got = geglu(&x).unwrap();
        let want = (x.narrow(2, 0, 37).unwrap() * x.narrow(2, 37, 37).unwrap().gelu_erf().unwrap())
            .unwrap();
        assert_eq!(got.dims(), &[3, 5, 37]);
        // The erf is good to 5e-7 absolute, so gelu(g) to about |g|·2.5e-7, and the
        // product to |v|·|g|·2.5e-7 plus f32 rounding: bound each value by that (an
        // absolute 2e-6 failed once in CI on a product of about 15).
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (v, g) = (
            flat(&x.narrow(2, 0, 37).unwrap()),
            flat(&x.narrow(2, 37, 37).unwrap()),
        );
        for (i, (a, b)) in flat(&got).iter().zip(flat(&want)).enumerate() {
            let tol = 1e-6 * (1.0 + v[i].abs() * (1.0 + g[i].abs()));
            assert!(
                (a - b).abs() <= tol,
                "value {i}: {a} vs {b}, tolerance {tol}"
            );
        }
        assert!(
            geglu(&Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap()).is_ok()
        );
        assert!(
            geglu(&Tensor::zeros((2, 5), candle_core::DType::F32, &Device::Cpu).unwrap()).is_err()
        );
    }
}
