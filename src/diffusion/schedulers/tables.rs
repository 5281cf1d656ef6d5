//! The numbers the schedulers are built from, with torch's and numpy's exact
//! arithmetic: beta schedules and `alphas_cumprod` (float32, as torch keeps
//! them), numpy's `linspace`/`arange`/`round`/`interp` (float64), sigmas, and
//! Karras sigmas. Ported from diffusers 0.42.1 `schedulers/` (see
//! [`super::common`] for the functions each comes from).

/// `torch.linspace(start, end, n, dtype=torch.float32)`: torch's CPU kernel computes
/// `start + step * i` for the first half and `end - step * (n - 1 - i)` for the second,
/// each with a single rounding (a fused multiply-add), `step` itself in float32.
pub fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    match n {
        0 => Vec::new(),
        1 => vec![s],
        _ => {
            let step = (e - s) / (n - 1) as f32;
            let half = n / 2;
            (0..n)
                .map(|i| {
                    if i < half {
                        step.mul_add(i as f32, s)
                    } else {
                        (-step).mul_add((n - 1 - i) as f32, e)
                    }
                })
                .collect()
        }
    }
}

/// `betas_for_alpha_bar(n, max_beta=0.999, alpha_transform_type="cosine")`: the
/// squared-cosine schedule, computed in Python floats (f64) and stored as float32.
/// (candle-transformers' copy divides integers here; this one does not.)
pub fn betas_for_alpha_bar(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.cumprod(1.0 - betas, dim=0)` on float32: torch's CPU kernel accumulates
/// the product in f64 and stores every prefix as f32.
pub fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32
        })
        .collect()
}

/// `rescale_zero_terminal_snr(betas)` (arXiv:2305.08891, Algorithm 1) in float32.
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let ac = alphas_cumprod(betas);
    let mut sqrt: Vec<f32> = ac.iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt[0], sqrt[sqrt.len() - 1]);
    let scale = first / (first - last);
    for v in &mut sqrt {
        *v -= last;
        *v *= scale;
    }
    let bar: Vec<f32> = sqrt.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// σ = ((1 − ᾱ) / ᾱ)^½ in float32, as `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`.
pub fn sigma_from_alpha_cumprod(alpha_cumprod: f32) -> f32 {
    ((1.0 - alpha_cumprod) / alpha_cumprod).sqrt()
}

/// The training sigmas, one per training timestep (float32).
pub fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| sigma_from_alpha_cumprod(a))
        .collect()
}

/// `np.log(sigmas)` of a float32 array: the result is float32 again.
pub fn log_sigmas(sigmas: &[f32]) -> Vec<f64> {
    sigmas
        .iter()
        .map(|&s| (s as f64).ln() as f32 as f64)
        .collect()
}

/// `np.linspace(start, stop, num)` (endpoint=True) in float64, with numpy's formula
/// `i * step + start` and the last element set to `stop`.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let div = num - 1;
    let delta = stop - start;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64).collect();
    if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            for v in &mut y {
                *v = *v / div as f64 * delta;
            }
        } else {
            for v in &mut y {
                *v *= step;
            }
        }
    } else {
        for v in &mut y {
            *v *= delta;
        }
    }
    for v in &mut y {
        *v += start;
    }
    if num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` in float64: length `ceil((stop - start) / step)`,
/// then numpy's fill, `start + i * ((start + step) - start)`.
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.round`: round half to even.
pub fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, np.arange(len(fp)), fp)` for one point, with numpy's formula
/// `slope * (x - xp[j]) + fp[j]` and clamping outside the range.
pub fn interp(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    if x.is_nan() || n == 0 {
        return f64::NAN;
    }
    if x < 0.0 {
        return fp[0];
    }
    if x >= (n - 1) as f64 {
        return fp[n - 1];
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j];
    }
    let slope = fp[j + 1] - fp[j];
    slope * (x - j as f64) + fp[j]
}

/// `_sigma_to_t(sigma, log_sigmas)`: the fractional training timestep whose
/// log-sigma, interpolated linearly, equals `ln(sigma)`.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let n = log_sigmas.len();
    if n < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    // low_idx = cumsum(dists >= 0).argmax().clip(max=n - 2): the first index where the
    // running count of log_sigmas <= log_sigma peaks.
    let (mut count, mut best, mut low) = (0usize, 0usize, 0usize);
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            low = i;
        }
    }
    let low = low.min(n - 2);
    let high = low + 1;
    let (lo, hi) = (log_sigmas[low], log_sigmas[high]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// `_convert_to_karras`: ρ = 7 interpolation between `sigma_max` and `sigma_min`.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}
