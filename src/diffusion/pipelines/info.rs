//! What the loaded model is and accepts, as the front ends validate
//! requests with it, and what one request may cost in memory.

use crate::diffusion::loading::config::{UNetConfig, VaeConfig};
use crate::diffusion::schedulers::SchedulerConfig;

/// What the loaded model is and accepts; front ends validate requests with it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// The folder or hub id the model was loaded from (logs only: a folder's
    /// path is not shown to callers).
    pub source: String,
    /// What callers are shown: the hub id, or the folder's last component.
    pub name: String,
    pub pipeline_class: String,
    /// Which model family the pipeline class is.
    pub family: Family,
    /// `unet.sample_size * vae_scale_factor`: the size the model was trained at.
    pub default_size: usize,
    pub vae_scale_factor: usize,
    pub latent_channels: usize,
    pub prediction_type: String,
    pub default_scheduler: String,
    pub dtype: String,
    pub device: String,
    /// The model's scheduler config, so requests are checked against the
    /// scheduler they will run with before they are accepted.
    #[serde(skip)]
    pub scheduler_config: SchedulerConfig,
    /// Sizes of the largest activations, to bound what one request allocates.
    pub memory: MemoryProfile,
    /// The steps and guidance a request that gives none gets.
    pub defaults: SamplingDefaults,
    /// Whether the UNet takes the guidance scale as an embedding
    /// (`time_cond_proj_dim`: LCM-distilled) instead of running guided.
    pub guidance_embedded: bool,
    /// Whether the UNet is an inpainting one (9 input channels: the latents, the
    /// mask and the masked picture's latents), which runs only to inpaint.
    pub inpainting: bool,
    /// An SDXL refiner (`requires_aesthetics_score`): its time ids carry
    /// aesthetic scores, and it runs only on a picture (image to image).
    pub refiner: bool,
}

/// The steps and guidance scale a request that leaves them out runs with:
/// the model's own where its folder says what it is (a distilled few-step
/// model), else its family's.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SamplingDefaults {
    pub steps: usize,
    pub guidance: f64,
}

impl SamplingDefaults {
    /// SD 1.x/2.x: diffusers' `StableDiffusionPipeline.__call__` guidance_scale
    /// (7.5); 30 steps, sdserve's default from the start, rather than its 50.
    pub const SD: Self = Self {
        steps: 30,
        guidance: 7.5,
    };
    /// SDXL: `StableDiffusionXLPipeline.__call__`'s guidance_scale 5.0; 30 steps.
    pub const SDXL: Self = Self {
        steps: 30,
        guidance: 5.0,
    };
    /// SD-Turbo and SDXL-Turbo (adversarial diffusion distillation, Sauer et al.
    /// 2023): one step without guidance, as their model cards run them
    /// (`num_inference_steps=1, guidance_scale=0.0`).
    pub const TURBO: Self = Self {
        steps: 1,
        guidance: 0.0,
    };

    /// LCM-distilled UNets (`time_cond_proj_dim`): diffusers'
    /// `LatentConsistencyModelPipeline.__call__` defaults, 4 steps at guidance
    /// 8.5 (embedded, not run as classifier-free guidance).
    pub const LCM: Self = Self {
        steps: 4,
        guidance: 8.5,
    };
    /// A folder whose scheduler is LCMScheduler but whose UNet takes no
    /// guidance embedding (an LCM-LoRA fused into a model): 4 steps without
    /// guidance, as the LCM-LoRA model cards run it.
    pub const LCM_SCHEDULER: Self = Self {
        steps: 4,
        guidance: 1.0,
    };

    /// The defaults of a model of `family` whose scheduler config names
    /// `scheduler_class` with `timestep_spacing`, and whose UNet does or does
    /// not embed the guidance scale. The Turbo folders are the only published
    /// ones whose scheduler is EulerAncestral with trailing spacing (sampling
    /// from the last training timestep, which a few-step model needs); a
    /// folder that says nothing more keeps its family's.
    pub fn detect(
        family: Family,
        scheduler_class: &str,
        timestep_spacing: Option<&str>,
        guidance_embedded: bool,
    ) -> Self {
        let turbo = scheduler_class == "EulerAncestralDiscreteScheduler"
            && timestep_spacing == Some("trailing");
        match family {
            _ if guidance_embedded => Self::LCM,
            _ if scheduler_class == "LCMScheduler" => Self::LCM_SCHEDULER,
            _ if turbo => Self::TURBO,
            Family::Sd => Self::SD,
            Family::Sdxl => Self::SDXL,
        }
    }
}

/// A model family: what its requests may carry and how its prompts are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Stable Diffusion 1.x/2.x (`StableDiffusionPipeline`).
    Sd,
    /// Stable Diffusion XL and its descendants (`StableDiffusionXLPipeline`).
    Sdxl,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sd => "sd",
            Self::Sdxl => "sdxl",
        }
    }

    /// The sizes (width, height) the family was trained at beyond the square
    /// default, where it publishes them: SDXL's aspect-ratio buckets (Podell et
    /// al. 2023, section 2.3, multi-aspect training).
    pub fn trained_sizes(self) -> &'static [(usize, usize)] {
        match self {
            Self::Sd => &[],
            Self::Sdxl => &[
                (1024, 1024),
                (1152, 896),
                (896, 1152),
                (1216, 832),
                (832, 1216),
                (1344, 768),
                (768, 1344),
                (1536, 640),
                (640, 1536),
            ],
        }
    }

    /// Whether the family has a second prompt and micro-conditioning.
    pub fn is_xl(self) -> bool {
        self == Self::Sdxl
    }
}

/// Working memory of one generation, from the architecture's widths: the UNet
/// keeps every down block's output for its skip connections (at most a few
/// tensors of `block_out_channels[0]` channels per latent cell per batch row),
/// and the VAE decoder, run one image at a time, keeps a few full-resolution
/// tensors of its widest full-resolution level.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct MemoryProfile {
    /// Bytes per latent cell per UNet batch row.
    pub latent_cell_bytes: u64,
    /// Bytes per output pixel of the image being decoded.
    pub decode_pixel_bytes: u64,
}

/// Live f32 tensors of the widest width the UNet holds at once per row (its
/// skip connections, a resnet's input, hidden state and output, attention
/// projections), rounded up.
const UNET_LIVE_TENSORS: u64 = 24;
/// The same for the VAE decoder at full resolution (input, normalised copy,
/// conv output, residual, plus the convolution's working buffers).
const VAE_LIVE_TENSORS: u64 = 8;

impl MemoryProfile {
    pub(super) fn of(unet: &UNetConfig, vae: &VaeConfig) -> Self {
        let f32_bytes = 4;
        let unet_width = unet.block_out_channels.iter().copied().max().unwrap_or(0) as u64;
        let vae_width = vae.block_out_channels.first().copied().unwrap_or(0) as u64;
        Self {
            // The widest level has a quarter (or less) of the cells of level 0
            // per halving, so level 0's width bounds the count well.
            latent_cell_bytes: unet.block_out_channels.first().copied().unwrap_or(0) as u64
                * f32_bytes
                * UNET_LIVE_TENSORS
                + unet_width * f32_bytes,
            decode_pixel_bytes: vae_width * f32_bytes * VAE_LIVE_TENSORS,
        }
    }
}

impl ModelInfo {
    /// Whether a request with `guidance` runs classifier-free guidance (an
    /// unconditional and a conditional UNet row per image): diffusers'
    /// `do_classifier_free_guidance`, `guidance_scale > 1 and
    /// unet.config.time_cond_proj_dim is None`.
    pub fn runs_cfg(&self, guidance: f64) -> bool {
        guidance > 1.0 && !self.guidance_embedded
    }

    /// Bytes one generation of `images` images of `width`x`height` may need
    /// beyond the loaded weights (`rows_per_image`: 2 under guidance), or `None`
    /// when the arithmetic would overflow (certainly too much).
    pub fn working_bytes(
        &self,
        width: usize,
        height: usize,
        images: usize,
        rows_per_image: usize,
    ) -> Option<u64> {
        let f = self.vae_scale_factor.max(1) as u64;
        let (w, h) = (width as u64, height as u64);
        let pixels = w.checked_mul(h)?;
        let cells = (w / f).checked_mul(h / f)?;
        let rows = (images as u64).checked_mul(rows_per_image as u64)?;
        let unet = cells
            .checked_mul(rows)?
            .checked_mul(self.memory.latent_cell_bytes)?;
        let decode = pixels.checked_mul(self.memory.decode_pixel_bytes)?;
        // The finished images, f32 RGB, kept until they are encoded.
        let outputs = pixels.checked_mul(images as u64)?.checked_mul(3 * 4)?;
        unet.checked_add(decode)?.checked_add(outputs)
    }
}
