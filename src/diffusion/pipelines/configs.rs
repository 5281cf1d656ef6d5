//! A diffusers folder's configs, read and cross-checked before any weight is:
//! which family its pipeline class is, whether the components fit each other,
//! and what the model accepts ([`ModelInfo`]).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::diffusion::loading::config::{self, ClipTextConfig, ModelIndex, UNetConfig, VaeConfig};
use crate::diffusion::schedulers::SchedulerConfig;
use crate::error::{Error, Result};

use super::{Family, MemoryProfile, ModelInfo, SamplingDefaults};

/// Pipeline classes whose components this module runs, and their families.
const SUPPORTED_PIPELINES: &[(&str, Family)] = &[
    ("StableDiffusionPipeline", Family::Sd),
    // An SD 1.x/2.x folder with an LCM-distilled UNet (SimianLuo/LCM_Dreamshaper_v7).
    ("LatentConsistencyModelPipeline", Family::Sd),
    ("StableDiffusionXLPipeline", Family::Sdxl),
    // Inpainting folders (stable-diffusion-inpainting, stable-diffusion-2-inpainting,
    // stable-diffusion-xl-1.0-inpainting-0.1): a 9-channel UNet, else the same parts.
    ("StableDiffusionInpaintPipeline", Family::Sd),
    ("StableDiffusionXLInpaintPipeline", Family::Sdxl),
    // The SDXL refiner (stable-diffusion-xl-refiner-1.0): only `text_encoder_2`,
    // aesthetic scores in the time ids, image to image only.
    ("StableDiffusionXLImg2ImgPipeline", Family::Sdxl),
];

/// Reads and checks the configs of the diffusers folder `dir` without loading
/// any weight: what [`StableDiffusion::load`](super::StableDiffusion::load)
/// would report for it on the CPU in f32, or the error it would fail with
/// before reading weights.
pub fn inspect(dir: &Path) -> Result<ModelInfo> {
    let cfgs = Configs::read(dir)?;
    cfgs.check()?;
    Ok(cfgs.info(dir, DType::F32, &Device::Cpu))
}

/// The configs of a diffusers folder's components, read before any weights.
pub(super) struct Configs {
    pub(super) index: ModelIndex,
    pub(super) family: Family,
    pub(super) unet: UNetConfig,
    pub(super) unet_path: PathBuf,
    pub(super) vae: VaeConfig,
    pub(super) vae_path: PathBuf,
    /// Absent in the SDXL refiner.
    pub(super) text_encoder: Option<ClipTextConfig>,
    /// SDXL's `text_encoder_2`.
    pub(super) text_encoder_2: Option<ClipTextConfig>,
    pub(super) scheduler: SchedulerConfig,
}

impl Configs {
    pub(super) fn read(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model_index.json");
        let index: ModelIndex = config::read_json(&index_path)?;
        let Some(&(_, family)) = SUPPORTED_PIPELINES
            .iter()
            .find(|(class, _)| *class == index.class_name)
        else {
            let names: Vec<&str> = SUPPORTED_PIPELINES.iter().map(|(c, _)| *c).collect();
            return Err(Error::model_file(
                &index_path,
                format!(
                    "pipeline class {:?} is not supported (supported: {})",
                    index.class_name,
                    names.join(", ")
                ),
            ));
        };
        // The SDXL refiner has only `text_encoder_2`; an SD folder needs its one encoder.
        let text_encoder = if index.says_absent("text_encoder") && family == Family::Sdxl {
            None
        } else {
            let te_path = dir.join("text_encoder/config.json");
            let cfg: ClipTextConfig = config::read_json(&te_path)?;
            cfg.validate(&te_path)?;
            Some(cfg)
        };
        let unet_path = dir.join("unet/config.json");
        let unet: UNetConfig = config::read_json(&unet_path)?;
        let vae_path = dir.join("vae/config.json");
        let vae: VaeConfig = config::read_json(&vae_path)?;
        let text_encoder_2 = match family {
            Family::Sd => None,
            Family::Sdxl => {
                let path = dir.join("text_encoder_2/config.json");
                let cfg: ClipTextConfig = config::read_json(&path)?;
                cfg.validate(&path)?;
                Some(cfg)
            }
        };
        let scheduler = SchedulerConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?;
        Ok(Self {
            index,
            family,
            unet,
            unet_path,
            vae,
            vae_path,
            text_encoder,
            text_encoder_2,
            scheduler,
        })
    }

    /// Every check that needs only the configs.
    pub(super) fn check(&self) -> Result<()> {
        self.check_sdxl_widths()?;
        self.check_latent_channels()
    }

    /// SDXL: the encoders' widths (the refiner has only the second) must add up
    /// to the UNet's `cross_attention_dim`, and the pooled width plus the
    /// embedded time ids (six; five with an aesthetic score) to its
    /// `projection_class_embeddings_input_dim` (what diffusers'
    /// `_get_add_time_ids` checks before the first step).
    fn check_sdxl_widths(&self) -> Result<()> {
        let Some(te2) = &self.text_encoder_2 else {
            if let Some(kind) = &self.unet.addition_embed_type {
                // Nothing would feed it: the UNet is an SDXL one in an SD folder.
                return Err(Error::model_file(
                    &self.unet_path,
                    format!(
                        "addition_embed_type {kind:?} needs the pooled text embedding and time ids \
                         of an SDXL pipeline; model_index.json says {}",
                        self.index.class_name
                    ),
                ));
            }
            return Ok(());
        };
        let first = self.text_encoder.as_ref().map_or(0, |t| t.hidden_size);
        let context = first + te2.hidden_size;
        let unet_context = self.unet.cross_attention_dim.get(0);
        if unet_context != Some(context) {
            return Err(Error::model_file(
                &self.unet_path,
                format!(
                    "cross_attention_dim {unet_context:?} is not the {first} + {} = {context} \
                     features of text_encoder and text_encoder_2",
                    te2.hidden_size
                ),
            ));
        }
        if self.unet.addition_embed_type.as_deref() != Some("text_time") {
            return Err(Error::model_file(
                &self.unet_path,
                "an SDXL UNet needs addition_embed_type \"text_time\"",
            ));
        }
        let time = self.unet.addition_time_embed_dim.unwrap_or(0);
        let ids = if self.index.requires_aesthetics_score {
            5
        } else {
            6
        };
        let passed = te2.projection_dim + ids * time;
        let expected = self.unet.projection_class_embeddings_input_dim;
        if expected != Some(passed) {
            return Err(Error::model_file(
                &self.unet_path,
                format!(
                    "projection_class_embeddings_input_dim {expected:?} is not the {passed} features \
                     SDXL passes (text_encoder_2's projection_dim {} + {ids} time ids x \
                     addition_time_embed_dim {time}; model_index.json's requires_aesthetics_score \
                     is {})",
                    te2.projection_dim, self.index.requires_aesthetics_score
                ),
            ));
        }
        Ok(())
    }

    /// The UNet must give the VAE's latents and take them, or (an inpainting
    /// UNet) take them with the mask and the masked picture's latents: `2c + 1`
    /// channels, diffusers' `StableDiffusionInpaintPipeline` layout.
    fn check_latent_channels(&self) -> Result<()> {
        let (unet, c) = (&self.unet, self.vae.latent_channels);
        if unet.out_channels != c || (unet.in_channels != c && unet.in_channels != 2 * c + 1) {
            return Err(Error::model_file(
                &self.unet_path,
                format!(
                    "in_channels {} / out_channels {} do not fit the VAE's latent_channels {c} \
                     (a UNet takes {c} channels, or {} to inpaint, and gives {c})",
                    unet.in_channels,
                    unet.out_channels,
                    2 * c + 1
                ),
            ));
        }
        Ok(())
    }

    /// Whether the UNet is an inpainting one (takes the mask and masked picture).
    pub(super) fn inpainting(&self) -> bool {
        self.unet.in_channels == 2 * self.vae.latent_channels + 1
    }

    /// What `/info` and image metadata say about the model in `dir`.
    pub(super) fn info(&self, dir: &Path, dtype: DType, device: &Device) -> ModelInfo {
        let vae_scale_factor = self.vae.scale_factor();
        let scheduler = self.scheduler.merged(&Default::default());
        let read = |key: &str| scheduler.get(key).and_then(|v| v.as_str());
        let prediction_type = read("prediction_type").unwrap_or("epsilon").to_string();
        let guidance_embedded = self.unet.time_cond_proj_dim.is_some();
        let defaults = SamplingDefaults::detect(
            self.family,
            self.scheduler.class_name(),
            read("timestep_spacing"),
            guidance_embedded,
        );
        ModelInfo {
            source: dir.display().to_string(),
            name: display_name(dir),
            pipeline_class: self.index.class_name.clone(),
            family: self.family,
            default_size: self.unet.sample_size().unwrap_or(64) * vae_scale_factor,
            vae_scale_factor,
            latent_channels: self.vae.latent_channels,
            prediction_type,
            default_scheduler: self.scheduler.class_name().to_string(),
            dtype: format!("{dtype:?}").to_lowercase(),
            device: device_name(device),
            scheduler_config: self.scheduler.clone(),
            memory: MemoryProfile::of(&self.unet, &self.vae),
            defaults,
            guidance_embedded,
            inpainting: self.inpainting(),
            refiner: self.index.requires_aesthetics_score,
        }
    }
}

/// A folder's last component (`stable-diffusion-v1-5`), never its full path.
fn display_name(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}
