//! What a Stable Diffusion model (1.x/2.x or SDXL) is made of once loaded from
//! an unmodified diffusers folder (tokenizers and CLIP text encoders, UNet,
//! VAE decoder, scheduler config), and the steps a pipeline composes: encode
//! the prompt, predict the noise, decode the latents.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::diffusion::layers::{activation_dtype, mixed_precision_kernel};
use crate::diffusion::loading::config::{ClipTextConfig, PerBlock, UNetConfig, VaeConfig};
use crate::diffusion::loading::single_file::Checkpoint;
use crate::diffusion::loading::tokenizer::ClipTokenizer;
use crate::diffusion::loading::weights::WeightFiles;
use crate::diffusion::models::clip::ClipTextModel;
use crate::diffusion::models::unet::UNet2DConditionModel;
use crate::diffusion::models::vae::AutoencoderKL;
use crate::diffusion::params::GenerateRequest;
use crate::diffusion::schedulers::{Scheduler, SchedulerConfig, SchedulerKind};
use crate::error::{Error, Result};

use super::configs::Configs;
use super::lcm::guidance_scale_embedding;
use super::sdxl::XlText;
use super::text::{ClipText, TextEncoders};
use super::{Conditioning, ModelInfo, SamplingDefaults};

/// Where and in what precision to compute.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype; `None` picks f32 on CPU and f16 on GPUs.
    pub dtype: Option<DType>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: None,
        }
    }
}

/// A loaded Stable Diffusion model (1.x/2.x or SDXL).
pub struct StableDiffusion {
    pub(super) info: ModelInfo,
    pub(super) text: TextEncoders,
    pub(super) unet: UNet2DConditionModel,
    pub(super) vae: AutoencoderKL,
    /// The dtype the VAE (encoder and decoder) takes.
    pub(super) vae_dtype: DType,
    pub(super) vae_scaling_factor: f64,
    pub(super) scheduler_config: SchedulerConfig,
    pub(super) device: Device,
    /// The dtype of the UNet's activations (f32 in the CPU's mixed precision).
    pub(super) dtype: DType,
}

impl std::fmt::Debug for StableDiffusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableDiffusion")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    }
}

/// Where the weights are read and in what dtypes.
struct Precision {
    device: Device,
    dtype: DType,
    /// Read `*.fp16.safetensors` variants where a folder has them.
    prefer_fp16: bool,
}

impl Precision {
    fn new(opts: &LoadOptions) -> Result<Self> {
        let device = opts.device.clone();
        let dtype = opts.dtype.unwrap_or_else(|| default_dtype(&device));
        if device.is_cpu() && dtype == DType::F16 {
            return Err(Error::invalid(
                "dtype",
                "f16 is not supported on the CPU; use f32, or bf16 (mixed precision: bf16 matmuls, f32 in between)",
            ));
        }
        // On the CPU, bf16 weights are packed from the full-precision files (what
        // diffusers' `torch_dtype=torch.bfloat16` loads without `variant="fp16"`).
        let prefer_fp16 = !device.is_cpu() && (dtype == DType::F16 || dtype == DType::BF16);
        Ok(Self {
            device,
            dtype,
            prefer_fp16,
        })
    }

    fn is_cpu_mixed(&self) -> bool {
        self.device.is_cpu() && self.dtype == DType::BF16
    }

    /// `sub`'s CLIP text encoder (`with_projection`: CLIPTextModelWithProjection)
    /// and the tokenizer in `dir`'s `tokenizer_sub`.
    fn clip_text(
        &self,
        (dir, weights): (&Path, &WeightSource<'_>),
        (sub, tokenizer_sub): (&str, &str),
        cfg: &ClipTextConfig,
        with_projection: bool,
    ) -> Result<ClipText> {
        let tokenizer =
            ClipTokenizer::from_dir(&dir.join(tokenizer_sub), cfg.max_position_embeddings)?;
        let encoder = self.text_encoder(weights, sub, cfg, with_projection)?;
        Ok(ClipText { tokenizer, encoder })
    }

    fn text_encoders(
        &self,
        files: (&Path, &WeightSource<'_>),
        cfgs: &Configs,
    ) -> Result<TextEncoders> {
        let first = cfgs
            .text_encoder
            .as_ref()
            .map(|cfg| self.clip_text(files, ("text_encoder", "tokenizer"), cfg, false))
            .transpose()?;
        Ok(match (&cfgs.text_encoder_2, first) {
            (None, Some(first)) => TextEncoders::Clip(first),
            (None, None) => {
                return Err(Error::Internal("a text encoder is needed".into()));
            }
            (Some(te2), first) => {
                let second = self.clip_text(files, ("text_encoder_2", "tokenizer_2"), te2, true)?;
                TextEncoders::Xl(XlText {
                    encoders: first.into_iter().chain([second]).collect(),
                    force_zeros_for_empty_prompt: cfgs.index.force_zeros_for_empty_prompt,
                    requires_aesthetics_score: cfgs.index.requires_aesthetics_score,
                })
            }
        })
    }

    fn text_encoder(
        &self,
        weights: &WeightSource<'_>,
        sub: &str,
        cfg: &ClipTextConfig,
        with_projection: bool,
    ) -> Result<ClipTextModel> {
        // The CPU's text encoder stays f32: it runs once per prompt.
        let dtype = if self.device.is_cpu() {
            DType::F32
        } else {
            self.dtype
        };
        let (vb, file) = weights.var_builder(sub, self.prefer_fp16, dtype, &self.device)?;
        ClipTextModel::new(vb, cfg, with_projection).map_err(|e| Error::model_file(file, e))
    }

    fn unet(&self, weights: &WeightSource<'_>, cfgs: &Configs) -> Result<UNet2DConditionModel> {
        let (vb, file) = weights.var_builder("unet", self.prefer_fp16, self.dtype, &self.device)?;
        build_unet(vb, &cfgs.unet, &cfgs.unet_path, &file)
    }

    /// The VAE and the dtype its inputs take (f32 in the CPU's mixed precision).
    fn vae(&self, weights: &WeightSource<'_>, cfgs: &Configs) -> Result<(AutoencoderKL, DType)> {
        // diffusers upcasts the VAE to f32 in f16 when `force_upcast` is set: its
        // decoder overflows f16 on real images.
        let dtype = if self.dtype == DType::F16 && cfgs.vae.force_upcast {
            DType::F32
        } else {
            self.dtype
        };
        let fp16 = self.prefer_fp16 && dtype != DType::F32;
        let (vb, file) = weights.var_builder("vae", fp16, dtype, &self.device)?;
        let input_dtype = activation_dtype(&vb);
        let vae = build_vae(vb, &cfgs.vae, &cfgs.vae_path, &file)?;
        Ok((vae, input_dtype))
    }
}

/// Where a model's weights are read: its diffusers folder, or one checkpoint
/// file in the original layout.
enum WeightSource<'a> {
    Folder(&'a Path),
    Checkpoint {
        file: &'a Checkpoint,
        /// The UNet's `layers_per_block` and the VAE's up blocks, which place
        /// the original blocks in diffusers' (`convert_ldm_*_checkpoint`).
        unet_layers_per_block: usize,
        vae_up_blocks: usize,
    },
}

impl WeightSource<'_> {
    /// Component `part`'s weights (`unet`, `vae`, `text_encoder`, ...) under
    /// diffusers' names, and the file to name in errors.
    fn var_builder(
        &self,
        part: &str,
        prefer_fp16: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<(VarBuilder<'static>, PathBuf)> {
        match self {
            Self::Folder(dir) => {
                let base = if part.starts_with("text_encoder") {
                    "model"
                } else {
                    "diffusion_pytorch_model"
                };
                let files = WeightFiles::find(&dir.join(part), base, prefer_fp16)?;
                Ok((files.var_builder(dtype, device)?, files.describe()))
            }
            Self::Checkpoint {
                file,
                unet_layers_per_block,
                vae_up_blocks,
            } => {
                let vb = match part {
                    "unet" => file.unet(*unet_layers_per_block, dtype, device),
                    "vae" => file.vae(*vae_up_blocks, dtype, device),
                    "text_encoder" => file.clip(dtype, device),
                    other => {
                        return Err(Error::model_file(
                            file.path(),
                            format!("reading {other} from a single file is not supported yet"),
                        ));
                    }
                };
                Ok((vb, file.path().to_path_buf()))
            }
        }
    }
}

impl StableDiffusion {
    /// Loads every component of the diffusers folder `dir`.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::model_file(dir, "no such model folder"));
        }
        let cfgs = Configs::read(dir)?;
        Self::load_parts(dir, cfgs, &WeightSource::Folder(dir), opts)
    }

    /// Loads a single-file checkpoint (`file`, original layout) with the
    /// configs and tokenizers of the diffusers folder `config_dir`, whose
    /// weights are never read (diffusers' `from_single_file(file, config=...)`).
    /// The checkpoint's family must be the folder's.
    pub fn load_single_file(file: &Path, config_dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let checkpoint = Checkpoint::open(file)?;
        let family = checkpoint.family()?;
        if !config_dir.is_dir() {
            return Err(Error::invalid(
                "config",
                format!("{} is not a folder", config_dir.display()),
            ));
        }
        let cfgs = Configs::read(config_dir)?;
        let folder_inpainting = cfgs.inpainting();
        if family.is_xl() {
            return Err(Error::model_file(
                file,
                format!(
                    "is an {} checkpoint: SDXL single files are not supported yet",
                    family.name()
                ),
            ));
        }
        if cfgs.family.is_xl() || family.inpainting() != folder_inpainting {
            return Err(Error::invalid(
                "config",
                format!(
                    "{} is a {} folder ({}), but {} is an {} checkpoint: give a folder of its family",
                    config_dir.display(),
                    cfgs.index.class_name,
                    if folder_inpainting {
                        "9-channel inpainting UNet"
                    } else {
                        "4-channel UNet"
                    },
                    file.display(),
                    family.name()
                ),
            ));
        }
        let unet_layers_per_block = match &cfgs.unet.layers_per_block {
            PerBlock::One(n) => *n,
            PerBlock::Each(_) => {
                return Err(Error::model_file(
                    &cfgs.unet_path,
                    "layers_per_block per block cannot place a single file's blocks (diffusers' \
                     converter takes one number)",
                ));
            }
        };
        let weights = WeightSource::Checkpoint {
            file: &checkpoint,
            unet_layers_per_block,
            vae_up_blocks: cfgs.vae.up_block_types.len(),
        };
        let mut model = Self::load_parts(config_dir, cfgs, &weights, opts)?;
        model.info.source = file.display().to_string();
        model.info.name = file.file_stem().map_or_else(
            || model.info.source.clone(),
            |s| s.to_string_lossy().into_owned(),
        );
        Ok(model)
    }

    /// Loads the components `cfgs` describes (read from `dir`), their weights
    /// from `weights`.
    fn load_parts(
        dir: &Path,
        cfgs: Configs,
        weights: &WeightSource<'_>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let precision = Precision::new(opts)?;
        if precision.is_cpu_mixed() {
            mixed_precision_kernel().map_err(|e| Error::invalid("SDSERVE_BF16_KERNEL", e))?;
        }
        cfgs.check()?;
        let text = precision.text_encoders((dir, weights), &cfgs)?;
        let unet = precision.unet(weights, &cfgs)?;
        let (vae, vae_dtype) = precision.vae(weights, &cfgs)?;
        Ok(Self {
            info: cfgs.info(dir, precision.dtype, &precision.device),
            text,
            dtype: unet.dtype(),
            unet,
            vae,
            vae_dtype,
            vae_scaling_factor: cfgs.vae.scaling_factor,
            scheduler_config: cfgs.scheduler,
            device: precision.device,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Replaces the steps and guidance requests that give none get (a
    /// server's `--default-steps` / `--default-guidance`).
    pub fn set_defaults(&mut self, defaults: SamplingDefaults) {
        self.info.defaults = defaults;
    }

    /// The first (SD 1.x/2.x: the only) tokenizer.
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.text.first().tokenizer
    }

    /// The text encoders of the model's family.
    pub fn text_encoders(&self) -> &TextEncoders {
        &self.text
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// Token ids `[len(texts), 77]` of the first tokenizer for `texts`.
    pub fn tokenize(&self, texts: &[&str]) -> Result<Tensor> {
        self.text.first().tokenize(texts, &self.device)
    }

    /// `last_hidden_state` of the (first) text encoder for each text: `[len(texts), 77, hidden]`.
    pub fn encode_text(&self, texts: &[&str]) -> Result<Tensor> {
        Ok(self
            .text
            .first()
            .encode(texts, &self.device)?
            .last_hidden_state)
    }

    /// What the UNet is conditioned on for one request's images (rows
    /// `[uncond × n, cond × n]` under guidance): diffusers' `encode_prompt` of
    /// the model's family, plus SDXL's pooled embedding and time ids.
    pub fn conditioning(&self, req: &GenerateRequest, guided: bool) -> Result<Conditioning> {
        let mut cond = self.text.conditioning(req, guided, &self.device)?;
        if let Some(dim) = self.unet.time_cond_dim() {
            // diffusers passes `guidance_scale - 1` (`w` of the LCM paper).
            let rows = cond.text.dim(0)?;
            cond.timestep_cond = Some(guidance_scale_embedding(
                req.guidance - 1.0,
                dim,
                rows,
                &self.device,
            )?);
        }
        Ok(cond)
    }

    /// The UNet's `encoder_hidden_states` for `n` images: `[uncond × n, cond × n]`
    /// with guidance, `[cond × n]` without (diffusers `encode_prompt` + the
    /// `torch.cat([negative_prompt_embeds, prompt_embeds])` in `__call__`).
    pub fn prompt_embeddings(
        &self,
        prompt: &str,
        negative: &str,
        n: usize,
        guided: bool,
    ) -> Result<Tensor> {
        let (texts, groups): (Vec<&str>, usize) = if guided {
            (vec![negative, prompt], 2)
        } else {
            (vec![prompt], 1)
        };
        if let TextEncoders::Xl(_) = self.text {
            return Err(Error::Internal(
                "prompt_embeddings is SD 1.x/2.x's; SDXL's conditioning comes from conditioning()"
                    .into(),
            ));
        }
        let emb = self.encode_text(&texts)?;
        let (_, seq, hidden) = emb.dims3()?;
        Ok(emb
            .unsqueeze(1)?
            .repeat((1, n, 1, 1))?
            .reshape((groups * n, seq, hidden))?)
    }

    /// One UNet evaluation: the noise (or v) prediction for `sample` at timestep `t`.
    pub fn predict(&self, sample: &Tensor, t: f64, embeddings: &Tensor) -> Result<Tensor> {
        Ok(self.unet.forward(sample, t, embeddings)?)
    }

    /// One UNet evaluation with every kind of conditioning the model takes.
    pub fn predict_with(&self, sample: &Tensor, t: f64, cond: &Conditioning) -> Result<Tensor> {
        Ok(self
            .unet
            .forward_with(sample, t, &cond.text, cond.extra())?)
    }

    /// The VAE decoder's raw output `[n, 3, H, W]` (about [-1, 1]) for latents
    /// already divided by the scaling factor.
    pub fn decode_raw(&self, z: &Tensor) -> Result<Tensor> {
        Ok(self.vae.decode(&z.to_dtype(self.vae_dtype)?)?)
    }

    /// Builds the job's scheduler (`Default` is the model's own class).
    pub fn scheduler(
        &self,
        kind: SchedulerKind,
        overrides: &serde_json::Map<String, serde_json::Value>,
        steps: usize,
    ) -> Result<Box<dyn Scheduler>> {
        self.scheduler_config.build(kind, overrides, steps)
    }

    /// Decodes final latents to images `[n, 3, H, W]` in [0, 1] on the CPU
    /// (`vae.decode(latents / scaling_factor)`, then `VaeImageProcessor.denormalize`).
    /// Images are decoded one at a time to bound peak memory.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let n = latents.dim(0)?;
        let mut images = Vec::with_capacity(n);
        for i in 0..n {
            let z = (latents.narrow(0, i, 1)?.to_dtype(self.vae_dtype)? / self.vae_scaling_factor)?;
            let img = self.decode_raw(&z)?.to_dtype(DType::F32)?;
            let img = ((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
            images.push(img.to_device(&Device::Cpu)?);
        }
        Ok(Tensor::cat(&images, 0)?)
    }
}

/// Builds the UNet described by `unet/config.json` (at `cfg_path`) from `vb`,
/// whose tensors come from `weights` (named in errors).
pub fn build_unet(
    vb: VarBuilder,
    cfg: &UNetConfig,
    cfg_path: &Path,
    weights: &Path,
) -> Result<UNet2DConditionModel> {
    UNet2DConditionModel::new(vb, cfg, cfg_path).map_err(|e| match e {
        Error::Candle(e) => Error::model_file(weights, e),
        other => other,
    })
}

/// Builds the VAE described by `vae/config.json` (at `cfg_path`) from `vb`,
/// whose tensors come from `weights` (named in errors).
pub fn build_vae(
    vb: VarBuilder,
    cfg: &VaeConfig,
    cfg_path: &Path,
    weights: &Path,
) -> Result<AutoencoderKL> {
    AutoencoderKL::new(vb, cfg, cfg_path).map_err(|e| match e {
        Error::Candle(e) => Error::model_file(weights, e),
        other => other,
    })
}

/// Picks the compute device by name: `cpu`, `cuda[:N]`, `metal[:N]`.
pub fn device_from_name(name: &str) -> Result<Device> {
    let (kind, ordinal) = match name.split_once(':') {
        Some((k, o)) => (
            k,
            o.parse::<usize>()
                .map_err(|_| Error::invalid("device", format!("bad device ordinal in {name:?}")))?,
        ),
        None => (name, 0),
    };
    // Only the first line of candle's error: it appends a backtrace when
    // RUST_BACKTRACE is set.
    let cannot_open = |e: candle_core::Error, hint: &str| {
        let cause = e.to_string().lines().next().unwrap_or_default().to_string();
        Error::invalid(
            "device",
            format!("cannot open {kind}:{ordinal}: {cause} ({hint})"),
        )
    };
    match kind {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(ordinal).map_err(|e| {
            cannot_open(
                e,
                if cfg!(feature = "cuda") {
                    "no usable NVIDIA GPU or driver; `--device cpu` runs without one"
                } else {
                    "this build has no CUDA support: build with `--features cuda` (deploy/build-cuda.sh)"
                },
            )
        }),
        "metal" => Device::new_metal(ordinal).map_err(|e| {
            cannot_open(
                e,
                if cfg!(feature = "metal") {
                    "no usable Metal GPU; `--device cpu` runs without one"
                } else {
                    "this build has no Metal support: build with `--features metal`"
                },
            )
        }),
        other => Err(Error::invalid(
            "device",
            format!("unknown device {other:?}; use cpu, cuda[:N] or metal[:N]"),
        )),
    }
}

/// Loads a model from a local folder or hub id.
pub fn load_model(
    source: &crate::diffusion::loading::hub::ModelSource,
    opts: &LoadOptions,
) -> Result<StableDiffusion> {
    let dtype = opts.dtype.unwrap_or_else(|| default_dtype(&opts.device));
    let dir: PathBuf = source.resolve(dtype != DType::F32)?;
    if let crate::diffusion::loading::hub::ModelSource::SingleFile { file, .. } = source {
        return StableDiffusion::load_single_file(file, &dir, opts);
    }
    let mut model = StableDiffusion::load(&dir, opts)?;
    if let crate::diffusion::loading::hub::ModelSource::Hub { repo, .. } = source {
        model.info.source = repo.clone();
        model.info.name = repo.clone();
    }
    Ok(model)
}
