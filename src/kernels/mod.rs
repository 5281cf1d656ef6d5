//! CPU compute that knows nothing of diffusion: convolution, attention,
//! GroupNorm, GEGLU, the bf16 matrix multiply and the math under them, as
//! candle custom ops on f32 tensors. Which layer uses which op, and in which
//! precision, is decided by `diffusion::layers`.

/// `fn name(args) -> ret` running `body(args)` compiled for AVX-512F or AVX2 + FMA,
/// whichever the CPU has (detected at run time), else for the baseline: for the CPU
/// kernels' loops, written branch-free so they vectorise.
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $body:ident) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

pub mod activations;
pub mod attention;
pub mod bf16;
pub mod conv;
pub mod linear;
pub mod math;
pub mod norm;

/// True when `SDSERVE_PLAIN_KERNELS=1`: the CPU convolution, GroupNorm and
/// attention kernels step aside for candle's own, for A/B
/// benchmarks in one binary and as a fallback if they misbehave.
pub fn plain_kernels() -> bool {
    static PLAIN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PLAIN.get_or_init(|| {
        std::env::var("SDSERVE_PLAIN_KERNELS")
            .is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
    })
}

/// The f32 values a CPU custom op's operand covers, which must be contiguous;
/// `op` and `what` name the op and operand in the error.
pub(crate) fn contiguous_f32<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} must be contiguous")))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// A raw pointer that may cross threads, for CPU kernels whose parallel tasks write
/// disjoint parts of one output.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Taking `self` makes closures capture the wrapper, not the bare pointer.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Helpers shared by the CPU kernels' unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::Tensor;

    /// Fixed pseudo-random values in `[offset, offset + scale)`: the CPU device
    /// can't be seeded, and rounding differences between kernels depend on the values.
    pub fn fixed(dims: &[usize], salt: f32, scale: f32, offset: f32) -> Tensor {
        let n: usize = dims.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 12.9898 + salt).sin() * 43758.547).fract() * scale + offset)
            .collect();
        Tensor::from_vec(data, dims, &candle_core::Device::Cpu).unwrap()
    }

    /// Largest absolute value.
    pub fn max_abs(t: &Tensor) -> f32 {
        let flat = t.abs().unwrap().flatten_all().unwrap();
        flat.max(candle_core::D::Minus1)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Largest absolute difference relative to `b`'s largest value.
    pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-6)
    }

    /// Largest absolute difference between two tensors of the same shape.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }
}
