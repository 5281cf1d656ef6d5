//! Server- or CLI-wide bounds on one request, and the working-memory budget
//! they default to.

use serde::Serialize;

use crate::diffusion::pipelines::SamplingDefaults;

/// Server- or CLI-wide bounds on what one request may ask for.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Limits {
    /// Largest width × height in pixels.
    pub max_pixels: usize,
    /// Largest width or height in pixels.
    pub max_side: usize,
    pub max_steps: usize,
    pub max_images: usize,
    /// Longest prompt or negative prompt, in characters.
    pub max_prompt_chars: usize,
    /// Most working memory one request may need beyond the loaded weights
    /// ([`ModelInfo::working_bytes`]): an allocation failure aborts the process,
    /// so a request that could exhaust memory is refused before it runs.
    pub max_request_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pixels: 1024 * 1024,
            max_side: 2048,
            max_steps: 500,
            max_images: 8,
            max_prompt_chars: 4000,
            max_request_bytes: default_request_bytes(),
        }
    }
}

impl Limits {
    /// The side a request that gives none gets: the model's default, made to
    /// fit these limits (the largest multiple of `multiple` within the side
    /// limit whose square is within the area limit), so that leaving the size
    /// out never asks for more than the server allows.
    pub fn default_side(&self, model_default: usize, multiple: usize) -> usize {
        let m = multiple.max(1);
        let side = model_default
            .min(self.max_side)
            .min(self.max_pixels.isqrt());
        (side / m * m).max(m)
    }

    /// The steps a request that gives none gets: the model's default
    /// ([`SamplingDefaults`]), or the limit when that is lower.
    pub fn default_steps(&self, model: &SamplingDefaults) -> usize {
        model.steps.min(self.max_steps).max(1)
    }

    /// These limits with room for a style's template: a styled prompt may be
    /// longer than what its caller typed, which is what the limit bounds.
    pub fn with_prompt_room(self, (prompt, negative): (usize, usize)) -> Self {
        Self {
            max_prompt_chars: self.max_prompt_chars + prompt.max(negative),
            ..self
        }
    }
}

/// Half of the memory this process may use: the machine's, or the container's
/// cgroup limit when lower (the other half holds the weights and the rest of
/// the process).
pub fn default_request_bytes() -> u64 {
    memory_limit_bytes().map_or(8 << 30, |m| m / 2)
}

/// Physical memory, capped by a cgroup v2 (`memory.max`) or v1 limit.
fn memory_limit_bytes() -> Option<u64> {
    let physical = {
        // SAFETY: sysconf only reads system configuration.
        let (pages, size) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        (pages > 0 && size > 0).then(|| (pages as u64).saturating_mul(size as u64))
    };
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .filter_map(|s| s.trim().parse::<u64>().ok())
    .min();
    match (physical, cgroup) {
        (Some(p), Some(c)) => Some(p.min(c)),
        (p, c) => p.or(c),
    }
}
