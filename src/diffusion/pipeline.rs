//! The text-to-image pipeline: diffusers' `StableDiffusionPipeline.__call__`
//! (`pipelines/stable_diffusion/pipeline_stable_diffusion.py`) on candle.
//!
//! Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
//! Models"; classifier-free guidance after Ho & Salimans 2022. Components load
//! once from an unmodified diffusers folder and stay loaded between requests.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::diffusion::clip::ClipTextModel;
use crate::diffusion::config::{self, ClipTextConfig, ModelIndex, UNetConfig, VaeConfig};
use crate::diffusion::latents::{NoiseSource, ReplayNoise, SeededNoise};
use crate::diffusion::layers::activation_dtype;
use crate::diffusion::params::GenerateRequest;
use crate::diffusion::schedulers::{Scheduler, SchedulerConfig, SchedulerKind};
use crate::diffusion::tokenizer::ClipTokenizer;
use crate::diffusion::unet::UNet2DConditionModel;
use crate::diffusion::vae::VaeDecoder;
use crate::diffusion::weights::WeightFiles;
use crate::error::{Error, Result};

/// Pipeline classes whose components this module runs.
const SUPPORTED_PIPELINES: &[&str] = &["StableDiffusionPipeline"];

/// What the loaded model is and accepts; front ends validate requests with it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// The folder or hub id the model was loaded from (logs only: a folder's
    /// path is not shown to callers).
    pub source: String,
    /// What callers are shown: the hub id, or the folder's last component.
    pub name: String,
    pub pipeline_class: String,
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
    fn of(unet: &UNetConfig, vae: &VaeConfig) -> Self {
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

/// Called after every denoising step; returning `false` cancels the job.
pub struct StepProgress<'a> {
    /// 1-based index of the step just finished.
    pub step: usize,
    pub total: usize,
    /// Latents after this step (diffusers' `callback_on_step_end` sees the same).
    pub latents: &'a Tensor,
}

/// Wall-clock seconds spent in each stage of one generation.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub text_encoder: f64,
    pub denoise: f64,
    pub steps: usize,
    pub vae_decode: f64,
}

/// The result of one request.
#[derive(Debug)]
pub struct Generated {
    /// `[n, 3, H, W]` f32 in [0, 1] on the CPU (diffusers `output_type="np"`, channel-first).
    pub images: Tensor,
    pub seeds: Vec<u64>,
    pub timings: Timings,
}

/// A loaded Stable Diffusion 1.x/2.x model.
pub struct StableDiffusion {
    info: ModelInfo,
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    unet: UNet2DConditionModel,
    vae: VaeDecoder,
    /// The dtype the VAE decoder takes.
    vae_dtype: DType,
    vae_scaling_factor: f64,
    scheduler_config: SchedulerConfig,
    device: Device,
    /// The dtype of the UNet's activations (f32 in the CPU's mixed precision).
    dtype: DType,
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

impl StableDiffusion {
    /// Loads every component of the diffusers folder `dir`.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let device = opts.device.clone();
        let dtype = opts.dtype.unwrap_or_else(|| default_dtype(&device));
        if device.is_cpu() && dtype == DType::F16 {
            return Err(Error::invalid(
                "dtype",
                "f16 is not supported on the CPU; use f32, or bf16 (mixed precision: bf16 matmuls, f32 in between)",
            ));
        }
        if !dir.is_dir() {
            return Err(Error::model_file(dir, "no such model folder"));
        }
        if device.is_cpu() && dtype == DType::BF16 {
            use crate::kernels::bf16::Kernel;
            let kernel =
                Kernel::configured().map_err(|e| Error::invalid("SDSERVE_BF16_KERNEL", e))?;
            match kernel {
                Kernel::Amx => {
                    tracing::info!(
                        bf16_kernel = kernel.name(),
                        "bf16 mixed precision on the CPU, matmuls on Intel AMX"
                    )
                }
                Kernel::Avx512Bf16 => tracing::info!(
                    bf16_kernel = kernel.name(),
                    "bf16 mixed precision on the CPU, matmuls with AVX-512 BF16 dot products (VDPBF16PS)"
                ),
                Kernel::Avx2 => tracing::info!(
                    bf16_kernel = kernel.name(),
                    "bf16 mixed precision on the CPU, matmuls with AVX2 on bf16 widened to f32 (no AMX or AVX-512 BF16): half the weight memory of f32, but slower than --dtype f32"
                ),
                Kernel::Portable => tracing::warn!(
                    bf16_kernel = kernel.name(),
                    "bf16 mixed precision on the CPU with the portable kernel: far slower than f32; --dtype f32 is faster here"
                ),
            }
        }
        let index_path = dir.join("model_index.json");
        let index: ModelIndex = config::read_json(&index_path)?;
        if !SUPPORTED_PIPELINES.contains(&index.class_name.as_str()) {
            return Err(Error::model_file(
                &index_path,
                format!(
                    "pipeline class {:?} is not supported (supported: {})",
                    index.class_name,
                    SUPPORTED_PIPELINES.join(", ")
                ),
            ));
        }
        // On the CPU, bf16 weights are packed from the full-precision files (what
        // diffusers' `torch_dtype=torch.bfloat16` loads without `variant="fp16"`).
        let prefer_fp16 = !device.is_cpu() && (dtype == DType::F16 || dtype == DType::BF16);
        // The CPU's text encoder stays f32: it runs once per prompt.
        let te_dtype = if device.is_cpu() { DType::F32 } else { dtype };

        let unet_cfg_path = dir.join("unet/config.json");
        let unet_cfg: UNetConfig = config::read_json(&unet_cfg_path)?;
        let vae_cfg_path = dir.join("vae/config.json");
        let vae_cfg: VaeConfig = config::read_json(&vae_cfg_path)?;
        let te_cfg_path = dir.join("text_encoder/config.json");
        let te_cfg: ClipTextConfig = config::read_json(&te_cfg_path)?;
        te_cfg.validate(&te_cfg_path)?;
        let scheduler_config =
            SchedulerConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?;

        let tokenizer =
            ClipTokenizer::from_dir(&dir.join("tokenizer"), te_cfg.max_position_embeddings)?;

        let te_files = WeightFiles::find(&dir.join("text_encoder"), "model", prefer_fp16)?;
        let text_encoder = ClipTextModel::new(te_files.var_builder(te_dtype, &device)?, &te_cfg)
            .map_err(|e| Error::model_file(te_files.describe(), e))?;

        let unet_files =
            WeightFiles::find(&dir.join("unet"), "diffusion_pytorch_model", prefer_fp16)?;
        let unet = build_unet(
            unet_files.var_builder(dtype, &device)?,
            &unet_cfg,
            &unet_cfg_path,
            &unet_files.describe(),
        )?;
        let compute_dtype = unet.dtype();
        if unet_cfg.in_channels != vae_cfg.latent_channels
            || unet_cfg.out_channels != vae_cfg.latent_channels
        {
            return Err(Error::model_file(
                &unet_cfg_path,
                format!(
                    "in_channels {} / out_channels {} do not match the VAE's latent_channels {} (inpainting UNets are not supported)",
                    unet_cfg.in_channels, unet_cfg.out_channels, vae_cfg.latent_channels
                ),
            ));
        }

        // diffusers upcasts the VAE to f32 in f16 when `force_upcast` is set: its
        // decoder overflows f16 on real images.
        let vae_dtype = if dtype == DType::F16 && vae_cfg.force_upcast {
            DType::F32
        } else {
            dtype
        };
        let vae_files = WeightFiles::find(
            &dir.join("vae"),
            "diffusion_pytorch_model",
            prefer_fp16 && vae_dtype != DType::F32,
        )?;
        let vae_vb = vae_files.var_builder(vae_dtype, &device)?;
        // The dtype decode inputs take (f32 in the CPU's mixed precision).
        let vae_dtype = activation_dtype(&vae_vb);
        let vae = build_vae(vae_vb, &vae_cfg, &vae_cfg_path, &vae_files.describe())?;

        let vae_scale_factor = vae_cfg.scale_factor();
        let default_size = unet_cfg.sample_size().unwrap_or(64) * vae_scale_factor;
        let prediction_type = scheduler_config
            .merged(&Default::default())
            .get("prediction_type")
            .and_then(|v| v.as_str())
            .unwrap_or("epsilon")
            .to_string();
        let info = ModelInfo {
            source: dir.display().to_string(),
            name: display_name(dir),
            pipeline_class: index.class_name,
            default_size,
            vae_scale_factor,
            latent_channels: vae_cfg.latent_channels,
            prediction_type,
            default_scheduler: scheduler_config.class_name().to_string(),
            dtype: format!("{dtype:?}").to_lowercase(),
            device: device_name(&device),
            scheduler_config: scheduler_config.clone(),
            memory: MemoryProfile::of(&unet_cfg, &vae_cfg),
        };
        Ok(Self {
            info,
            tokenizer,
            text_encoder,
            unet,
            vae,
            vae_dtype,
            vae_scaling_factor: vae_cfg.scaling_factor,
            scheduler_config,
            device,
            dtype: compute_dtype,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
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

    /// Token ids `[len(texts), 77]` for `texts`.
    pub fn tokenize(&self, texts: &[&str]) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(texts.len() * self.tokenizer.max_len());
        for t in texts {
            ids.extend(self.tokenizer.encode(t)?.0);
        }
        Ok(Tensor::from_vec(
            ids,
            (texts.len(), self.tokenizer.max_len()),
            &self.device,
        )?)
    }

    /// `last_hidden_state` of the text encoder for each text: `[len(texts), 77, hidden]`.
    pub fn encode_text(&self, texts: &[&str]) -> Result<Tensor> {
        self.text_encoder.forward(&self.tokenize(texts)?)
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

    /// The denoising loop. `latents` are the unit-variance initial latents
    /// (scaled by `init_noise_sigma` here, as diffusers' `prepare_latents` does);
    /// `embeddings` come from [`Self::prompt_embeddings`]. `guidance <= 1` runs
    /// the conditional pass only.
    pub fn denoise(
        &self,
        embeddings: &Tensor,
        latents: &Tensor,
        scheduler: &mut dyn Scheduler,
        guidance: f64,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(StepProgress<'_>) -> bool,
    ) -> Result<Tensor> {
        let guided = guidance > 1.0;
        let embeddings = embeddings.to_dtype(self.dtype)?;
        let mut latents = (latents.to_device(&self.device)?.to_dtype(self.dtype)?
            * scheduler.init_noise_sigma())?;
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(&input, i)?;
            let pred = self.predict(&input, t, &embeddings)?;
            let pred = if guided {
                let n = latents.dim(0)?;
                let uncond = pred.narrow(0, 0, n)?;
                let cond = pred.narrow(0, n, n)?;
                (&uncond + ((cond - &uncond)? * guidance)?)?
            } else {
                pred
            };
            latents = scheduler.step(&pred, i, &latents, noise)?;
            if !progress(StepProgress {
                step: i + 1,
                total,
                latents: &latents,
            }) {
                return Err(Error::Cancelled);
            }
        }
        Ok(latents)
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

    /// Runs one validated request end to end.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        progress: &mut dyn FnMut(StepProgress<'_>) -> bool,
    ) -> Result<Generated> {
        let mut out = self.generate_batch(&[req], progress)?;
        Ok(out.remove(0))
    }

    /// Runs requests that [`GenerateRequest::batches_with`] each other as one
    /// UNet batch (rows: every request's images, uncond halves first under
    /// guidance). Each image comes from its own seed, so it is the same as when
    /// its request runs alone. Returns one result per request, in order; the
    /// timings are the batch's.
    pub fn generate_batch(
        &self,
        reqs: &[&GenerateRequest],
        progress: &mut dyn FnMut(StepProgress<'_>) -> bool,
    ) -> Result<Vec<Generated>> {
        let Some(&first) = reqs.first() else {
            return Ok(Vec::new());
        };
        if reqs.len() > 1 && reqs.iter().any(|r| !first.batches_with(r)) {
            return Err(Error::Internal(
                "requests in one batch need the same size, steps, scheduler, guidance and no given latents"
                    .into(),
            ));
        }
        let mut timings = Timings::default();
        let guided = first.guidance > 1.0;
        let t0 = Instant::now();
        let per_request = reqs
            .iter()
            .map(|r| self.prompt_embeddings(&r.prompt, &r.negative_prompt, r.num_images, guided))
            .collect::<Result<Vec<_>>>()?;
        let embeddings = if per_request.len() == 1 {
            per_request[0].clone()
        } else if guided {
            // [uncond of every request..., cond of every request...], as denoise expects.
            let halves = |second: bool| {
                reqs.iter().zip(&per_request).map(move |(r, e)| {
                    e.narrow(0, if second { r.num_images } else { 0 }, r.num_images)
                })
            };
            let rows = halves(false)
                .chain(halves(true))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&rows, 0)?
        } else {
            Tensor::cat(&per_request, 0)?
        };
        timings.text_encoder = t0.elapsed().as_secs_f64();

        let seeds: Vec<u64> = reqs.iter().flat_map(|r| r.seeds()).collect();
        let mut seeded = SeededNoise::new(&seeds);
        let f = self.info.vae_scale_factor;
        let latents = match &first.latents {
            Some(given) => given.latents.clone(),
            None => seeded.initial_latents(
                self.info.latent_channels,
                first.height / f,
                first.width / f,
                &Device::Cpu,
            )?,
        };
        let mut replay;
        let noise: &mut dyn NoiseSource =
            match first.latents.as_ref().and_then(|g| g.step_noise.as_ref()) {
                Some(steps) => {
                    replay = ReplayNoise::new(
                        steps
                            .chunk(steps.dim(0)?, 0)?
                            .into_iter()
                            .map(|t| t.squeeze(0))
                            .collect::<candle_core::Result<Vec<_>>>()?,
                    );
                    &mut replay
                }
                None => &mut seeded,
            };
        let mut scheduler =
            self.scheduler(first.scheduler, &first.scheduler_options, first.steps)?;
        timings.steps = scheduler.timesteps().len();
        let t1 = Instant::now();
        let latents = self.denoise(
            &embeddings,
            &latents,
            scheduler.as_mut(),
            first.guidance,
            noise,
            progress,
        )?;
        timings.denoise = t1.elapsed().as_secs_f64();
        let t2 = Instant::now();
        let images = self.decode(&latents)?;
        timings.vae_decode = t2.elapsed().as_secs_f64();
        let mut offset = 0;
        let mut out = Vec::with_capacity(reqs.len());
        for r in reqs {
            out.push(Generated {
                images: images.narrow(0, offset, r.num_images)?,
                seeds: r.seeds(),
                timings: timings.clone(),
            });
            offset += r.num_images;
        }
        Ok(out)
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
) -> Result<VaeDecoder> {
    VaeDecoder::new(vb, cfg, cfg_path).map_err(|e| match e {
        Error::Candle(e) => Error::model_file(weights, e),
        other => other,
    })
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
    source: &crate::diffusion::hub::ModelSource,
    opts: &LoadOptions,
) -> Result<StableDiffusion> {
    let dtype = opts.dtype.unwrap_or_else(|| default_dtype(&opts.device));
    let dir: PathBuf = source.resolve(dtype != DType::F32)?;
    let mut model = StableDiffusion::load(&dir, opts)?;
    if let crate::diffusion::hub::ModelSource::Hub { repo, .. } = source {
        model.info.source = repo.clone();
        model.info.name = repo.clone();
    }
    Ok(model)
}
