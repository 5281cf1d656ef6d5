//! The layers the models are built from: Linear, Conv2d and GroupNorm, each
//! choosing between candle's op and a CPU kernel of [`crate::kernels`]; the
//! blocks made of them (resnet, down/upsampling, attention and transformer
//! blocks) that the UNet and the VAE share; and the rule that decides how
//! the models store their matmul weights (the precision choice lives here only).
//!
//! On the CPU with the `bf16` dtype, models run in mixed precision, the way PyTorch's
//! CPU autocast runs them: linear and convolution weights are packed once into bf16
//! ([`crate::kernels::bf16`]) and multiplied in bf16 with f32 sums; everything between the
//! matmuls (norms, activations, softmax, residuals, the scheduler) stays in f32. The
//! weights' VarBuilder then has dtype `BF16` only as that signal: every tensor is read
//! from it as f32 ([`parameters`]). On other devices or dtypes, candle's layers.

use candle_core::DType;
use candle_nn::VarBuilder;

pub mod conv;
pub mod linear;
pub mod norm;
pub mod resnet;
pub mod transformer;

pub use crate::kernels::bf16::Kernel;
pub use crate::kernels::plain_kernels;
// The attention and GEGLU kernels pick their own path (fused CPU kernel,
// chunked, or candle's) from the tensors they get: the models call them
// through here.
pub use crate::kernels::activations::geglu;
pub use crate::kernels::attention::attention;

/// The bf16 kernel the CPU's mixed precision will multiply with (what
/// `SDSERVE_BF16_KERNEL` names, else the fastest usable one), announced in the
/// log with the field `bf16_kernel`; the error says why a named kernel can't run.
pub fn mixed_precision_kernel() -> std::result::Result<Kernel, String> {
    let kernel = Kernel::configured()?;
    let mode = "bf16 mixed precision on the CPU";
    if kernel == Kernel::Portable {
        tracing::warn!(bf16_kernel = kernel.name(), "{mode}, {}", kernel.describe());
    } else {
        tracing::info!(bf16_kernel = kernel.name(), "{mode}, {}", kernel.describe());
    }
    Ok(kernel)
}

/// True when the layers built from `vb` are mixed precision (CPU and `BF16`).
pub fn packs_bf16(vb: &VarBuilder) -> bool {
    vb.device().is_cpu() && vb.dtype() == DType::BF16
}

/// The dtype of the activations of layers built from `vb`: f32 in mixed precision,
/// else the weights' dtype.
pub fn activation_dtype(vb: &VarBuilder) -> DType {
    if packs_bf16(vb) {
        DType::F32
    } else {
        vb.dtype()
    }
}

/// `vb` for reading parameters that stay in the activation dtype (norm scales,
/// biases, and matmul weights before they are packed).
pub fn parameters<'a>(vb: &VarBuilder<'a>) -> VarBuilder<'a> {
    vb.to_dtype(activation_dtype(vb))
}
