//! Initial latents and scheduler noise, drawn on the CPU from per-image seeds.
//!
//! Each image owns one ChaCha8 stream seeded from its own seed, so an image is
//! the same on CPU, CUDA and Metal and whatever else shares its batch: the
//! stream first yields the initial latents, then any ancestral-sampling noise.
//! Normal samples come from the Box–Muller transform on 53-bit uniforms.

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use crate::error::Result;

/// Where a scheduler gets the fresh noise it adds (ancestral sampling).
pub trait NoiseSource {
    /// Standard normal noise shaped, placed and typed like `like` ([n, c, h, w]).
    fn noise_like(&mut self, like: &Tensor) -> Result<Tensor>;
}

/// One seeded standard-normal stream per image of a batch.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    streams: Vec<NormalStream>,
}

impl SeededNoise {
    pub fn new(seeds: &[u64]) -> Self {
        Self {
            streams: seeds.iter().map(|&s| NormalStream::new(s)).collect(),
        }
    }

    /// Draws `[n, c, h, w]` unit-variance initial latents, image `i` from seed `i`.
    pub fn initial_latents(
        &mut self,
        c: usize,
        h: usize,
        w: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let per_image = c * h * w;
        let mut data = Vec::with_capacity(per_image * self.streams.len());
        for stream in &mut self.streams {
            data.extend((0..per_image).map(|_| stream.next_f32()));
        }
        Ok(Tensor::from_vec(
            data,
            (self.streams.len(), c, h, w),
            device,
        )?)
    }
}

impl NoiseSource for SeededNoise {
    fn noise_like(&mut self, like: &Tensor) -> Result<Tensor> {
        let dims = like.dims();
        let n = dims.first().copied().unwrap_or(1);
        let per_image: usize = dims.iter().skip(1).product();
        if n != self.streams.len() {
            return Err(candle_core::Error::Msg(format!(
                "noise requested for {n} images but {} seeds were given",
                self.streams.len()
            ))
            .into());
        }
        let mut data = Vec::with_capacity(per_image * n);
        for stream in &mut self.streams {
            data.extend((0..per_image).map(|_| stream.next_f32()));
        }
        let t = Tensor::from_vec(data, dims, &Device::Cpu)?;
        Ok(t.to_device(like.device())?.to_dtype(like.dtype())?)
    }
}

/// Replays recorded noise tensors in order (diffusers parity tests).
#[derive(Debug, Default)]
pub struct ReplayNoise {
    queue: std::collections::VecDeque<Tensor>,
}

impl ReplayNoise {
    pub fn new(tensors: impl IntoIterator<Item = Tensor>) -> Self {
        Self {
            queue: tensors.into_iter().collect(),
        }
    }
}

impl NoiseSource for ReplayNoise {
    fn noise_like(&mut self, like: &Tensor) -> Result<Tensor> {
        let t = self
            .queue
            .pop_front()
            .ok_or_else(|| candle_core::Error::Msg("replayed noise exhausted".to_string()))?;
        Ok(t.to_device(like.device())?.to_dtype(like.dtype())?)
    }
}

/// Standard normal samples from a ChaCha8 stream (Box–Muller, both outputs used).
#[derive(Debug, Clone)]
struct NormalStream {
    rng: ChaCha8Rng,
    spare: Option<f64>,
}

impl NormalStream {
    fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            spare: None,
        }
    }

    /// Uniform in (0, 1], 53 bits.
    fn uniform(&mut self) -> f64 {
        ((self.rng.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn next_f32(&mut self) -> f32 {
        if let Some(z) = self.spare.take() {
            return z as f32;
        }
        let r = (-2.0 * self.uniform().ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * self.uniform();
        self.spare = Some(r * theta.sin());
        (r * theta.cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_noise_and_batch_independent() {
        let dev = Device::Cpu;
        let a = SeededNoise::new(&[7])
            .initial_latents(4, 8, 8, &dev)
            .unwrap();
        let ab = SeededNoise::new(&[7, 8])
            .initial_latents(4, 8, 8, &dev)
            .unwrap();
        let a2 = ab.get(0).unwrap().unsqueeze(0).unwrap();
        let diff: f32 = (a - a2)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn noise_is_standard_normal() {
        let mut s = NormalStream::new(1);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| s.next_f32() as f64).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }
}
