//! A linear layer's matmul (`y = x Wᵀ + b`) with its weight packed once in
//! bf16 and f32 activations and sums ([`super::bf16`]): what the `bf16` dtype
//! runs on the CPU.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::bf16::{Options, PackedA, PackedB, gemm};
use super::contiguous_f32;

/// A linear layer with its weight packed in bf16, run on f32 activations.
#[derive(Debug, Clone)]
pub struct Bf16Linear {
    /// `Wᵀ` `[in, out]`, packed.
    weight: Arc<PackedB>,
    bias: Option<Arc<Vec<f32>>>,
}

impl Bf16Linear {
    /// Packs `weight` `[out, in]` (f32, CPU) in bf16; `bias` `[out]`.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        let w = weight.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let bias = match bias {
            Some(b) => Some(Arc::new(b.to_vec1::<f32>()?)),
            None => None,
        };
        Ok(Self {
            weight: Arc::new(PackedB::from_cols(&w, in_dim, out_dim, in_dim)),
            bias,
        })
    }
}

impl CustomOp1 for Bf16Linear {
    fn name(&self) -> &'static str {
        "sdserve-bf16-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "linear", "input")?;
        let (k, n) = (self.weight.depth(), self.weight.cols());
        let dims = layout.shape().dims();
        if k == 0 || dims.last() != Some(&k) {
            candle_core::bail!("linear: input {:?} does not end in {k} features", dims);
        }
        let m = x.len() / k;
        let a = PackedA::from_rows(x, m, k, k);
        let mut opts = Options::default();
        let mut out = match &self.bias {
            // The products are accumulated onto the bias, written once.
            Some(b) => {
                let mut out = Vec::with_capacity(m * n);
                (0..m).for_each(|_| out.extend_from_slice(b));
                out
            }
            None => {
                opts.overwrite = true;
                vec![0f32; m * n]
            }
        };
        gemm(&a, &self.weight, &mut out, n, opts);
        let mut shape = dims.to_vec();
        *shape.last_mut().unwrap() = n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}
