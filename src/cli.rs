//! Command-line interface: `sdserve serve` (assembling the engine, job
//! service and HTTP server), `sdserve generate` and `sdserve download`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};

use crate::diffusion::loading::hub::ModelSource;
use crate::diffusion::pipelines::{LoadOptions, StableDiffusion, device_from_name, load_model};
use crate::error::{Error, Result};
use crate::output::{ImageMetadata, encode_png, read_png_metadata, to_rgb8};
use crate::request::{GenerateParams, GivenLatents, Limits};

#[derive(Debug, Parser)]
#[command(
    name = "sdserve",
    version,
    about = "Self-hosted Stable Diffusion text-to-image on candle"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr: `text`, or `json` (one object per line, e.g. for CloudWatch).
    #[arg(long, global = true, env = "SDSERVE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images from a prompt and write them as PNG files.
    Generate(Box<GenerateArgs>),
    /// Download a model from the Hugging Face hub into the HF cache.
    Download(DownloadArgs),
    /// Serve HTTP: the SageMaker container contract (GET /ping, POST /invocations).
    Serve(Box<ServeArgs>),
}

/// Where the model comes from and how to run it.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A diffusers model folder, or a Hugging Face hub repo id (org/name).
    #[arg(long, env = "SDSERVE_MODEL")]
    pub model: Option<String>,
    /// Hub revision (branch, tag or commit) when --model is a repo id.
    #[arg(long, env = "SDSERVE_REVISION")]
    pub revision: Option<String>,
    /// Compute device: cpu, cuda[:N] or metal[:N].
    #[arg(long, env = "SDSERVE_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Compute precision: f32, f16 or bf16 (default: f32 on CPU, f16 on GPU).
    #[arg(long, env = "SDSERVE_DTYPE")]
    pub dtype: Option<String>,
}

impl ModelArgs {
    pub fn load_options(&self) -> Result<LoadOptions> {
        let device: Device = device_from_name(&self.device)?;
        let dtype = match self.dtype.as_deref() {
            None => None,
            Some("f32" | "float32") => Some(DType::F32),
            Some("f16" | "float16" | "fp16") => Some(DType::F16),
            Some("bf16" | "bfloat16") => Some(DType::BF16),
            Some(other) => {
                return Err(Error::invalid(
                    "dtype",
                    format!("unknown dtype {other:?}; use f32, f16 or bf16"),
                ));
            }
        };
        Ok(LoadOptions { device, dtype })
    }

    /// The `--model` source; `None` when no model was named.
    pub fn source(&self) -> Result<Option<ModelSource>> {
        self.model
            .as_deref()
            .map(|m| ModelSource::parse(m, self.revision.as_deref()))
            .transpose()
    }

    pub fn load(&self) -> Result<StableDiffusion> {
        let source = self.source()?.ok_or_else(|| {
            Error::invalid(
                "model",
                "required: a diffusers folder or hub repo id (or SDSERVE_MODEL)",
            )
        })?;
        load_model(&source, &self.load_options()?)
    }
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// What to draw.
    #[arg(long)]
    pub prompt: Option<String>,
    /// What to steer away from (classifier-free guidance).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    #[command(flatten)]
    pub xl: XlArgs,
    /// Denoising steps [default: 30].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Guidance scale; 1 or less disables classifier-free guidance [default: 7.5].
    #[arg(long)]
    pub guidance: Option<f64>,
    /// default, ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, pndm.
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Override a scheduler config key, e.g. timestep_spacing=trailing (repeatable;
    /// values are JSON, or plain strings).
    #[arg(long = "scheduler-option", value_name = "KEY=VALUE")]
    pub scheduler_option: Vec<String>,
    /// Image width in pixels, a multiple of 8 [default: the model's size].
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels, a multiple of 8 [default: the model's size].
    #[arg(long)]
    pub height: Option<usize>,
    /// Seed of the first image; image i uses seed + i [default: random].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number of images.
    #[arg(long)]
    pub num_images: Option<usize>,
    /// A safetensors file whose `latents` tensor [n, 4, h/8, w/8] (f32) replaces
    /// the seeded initial noise, like diffusers' `latents=` argument. An optional
    /// `noise` tensor [steps, n, 4, h/8, w/8] replaces ancestral schedulers' noise.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Take every parameter from a PNG that sdserve wrote (flags given here win).
    #[arg(long)]
    pub from_image: Option<PathBuf>,
    /// Output PNG; with several images, NAME-0.png, NAME-1.png, ...
    #[arg(long, short, default_value = "out.png")]
    pub output: PathBuf,
    /// Largest width x height accepted.
    #[arg(long, env = "SDSERVE_MAX_PIXELS", default_value_t = Limits::default().max_pixels)]
    pub max_pixels: usize,
}

/// SDXL's second prompts and micro-conditioning (diffusers'
/// `StableDiffusionXLPipeline.__call__` arguments); sizes are HEIGHT,WIDTH.
#[derive(Debug, Args)]
pub struct XlArgs {
    /// SDXL: the second text encoder's prompt [default: --prompt].
    #[arg(long = "prompt-2")]
    pub prompt_2: Option<String>,
    /// SDXL: the second text encoder's negative prompt [default: --negative-prompt].
    #[arg(long = "negative-prompt-2")]
    pub negative_prompt_2: Option<String>,
    /// SDXL: original size to condition on, HEIGHT,WIDTH [default: the image's].
    #[arg(long, value_name = "H,W", value_parser = parse_pair)]
    pub original_size: Option<[u32; 2]>,
    /// SDXL: crop corner to condition on, TOP,LEFT [default: 0,0].
    #[arg(long, value_name = "TOP,LEFT", value_parser = parse_pair)]
    pub crops_coords_top_left: Option<[u32; 2]>,
    /// SDXL: target size to condition on, HEIGHT,WIDTH [default: the image's].
    #[arg(long, value_name = "H,W", value_parser = parse_pair)]
    pub target_size: Option<[u32; 2]>,
    /// SDXL: --original-size of the unconditional pass (needs --negative-target-size).
    #[arg(long, value_name = "H,W", value_parser = parse_pair)]
    pub negative_original_size: Option<[u32; 2]>,
    /// SDXL: --crops-coords-top-left of the unconditional pass.
    #[arg(long, value_name = "TOP,LEFT", value_parser = parse_pair)]
    pub negative_crops_coords_top_left: Option<[u32; 2]>,
    /// SDXL: --target-size of the unconditional pass (needs --negative-original-size).
    #[arg(long, value_name = "H,W", value_parser = parse_pair)]
    pub negative_target_size: Option<[u32; 2]>,
}

impl XlArgs {
    /// Puts the flags given over what `params` holds.
    fn apply(&self, params: &mut GenerateParams) {
        let m = &mut params.micro;
        let given = [
            (&mut m.original_size, self.original_size),
            (&mut m.crops_coords_top_left, self.crops_coords_top_left),
            (&mut m.target_size, self.target_size),
            (&mut m.negative_original_size, self.negative_original_size),
            (
                &mut m.negative_crops_coords_top_left,
                self.negative_crops_coords_top_left,
            ),
            (&mut m.negative_target_size, self.negative_target_size),
        ];
        for (slot, flag) in given {
            if flag.is_some() {
                *slot = flag;
            }
        }
        if self.prompt_2.is_some() {
            params.prompt_2 = self.prompt_2.clone();
        }
        if self.negative_prompt_2.is_some() {
            params.negative_prompt_2 = self.negative_prompt_2.clone();
        }
    }
}

/// `"1024,768"` (also `x`) as a pair of non-negative integers.
fn parse_pair(s: &str) -> std::result::Result<[u32; 2], String> {
    let (a, b) = s
        .split_once([',', 'x', 'X'])
        .ok_or_else(|| format!("{s:?} is not two integers A,B"))?;
    let int = |v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|_| format!("{v:?} is not a non-negative integer"))
    };
    Ok([int(a)?, int(b)?])
}

#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// Hub repo id, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5.
    pub repo: String,
    #[arg(long)]
    pub revision: Option<String>,
    /// Fetch the *.fp16.safetensors weights (for GPU use) instead of full precision.
    #[arg(long)]
    pub fp16: bool,
}

/// Renders an error for the terminal, naming the flag for invalid values.
pub fn describe_error(e: &Error) -> String {
    match e {
        Error::InvalidRequest { field, message } => {
            // Request fields are named like the flags, except this plural; an
            // environment variable (upper case) is named as it is.
            let flag = match field.as_str() {
                "scheduler_options" => "--scheduler-option".to_string(),
                f if f.starts_with("scheduler_options.") => {
                    format!("--scheduler-option {}", &f["scheduler_options.".len()..])
                }
                f if f.starts_with("SDSERVE_") => format!("environment variable {f}"),
                f => format!("--{}", f.replace('_', "-")),
            };
            format!("invalid value for {flag}: {message}")
        }
        other => other.to_string(),
    }
}

fn load_latents(path: &Path) -> Result<GivenLatents> {
    if !path.is_file() {
        return Err(Error::invalid(
            "latents",
            format!("{}: no such file", path.display()),
        ));
    }
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        Error::invalid(
            "latents",
            format!("{}: not a safetensors file: {e}", path.display()),
        )
    })?;
    let t = tensors.get("latents").ok_or_else(|| {
        Error::invalid(
            "latents",
            format!("{}: has no tensor named `latents`", path.display()),
        )
    })?;
    let step_noise = tensors
        .get("noise")
        .map(|n| n.to_dtype(DType::F32))
        .transpose()?;
    Ok(GivenLatents {
        latents: t.to_dtype(DType::F32)?,
        step_noise,
    })
}

/// Output path of image `i` of `n`.
pub fn output_path(base: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return base.to_path_buf();
    }
    let stem = base
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let ext = base
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    base.with_file_name(format!("{stem}-{i}.{ext}"))
}

pub fn run_generate(args: &GenerateArgs) -> Result<Vec<PathBuf>> {
    let mut params = match &args.from_image {
        Some(p) => {
            let m = read_png_metadata(p)?;
            GenerateParams {
                prompt: Some(m.prompt),
                negative_prompt: m.negative_prompt,
                prompt_2: m.prompt_2,
                negative_prompt_2: m.negative_prompt_2,
                micro: m.micro,
                width: Some(m.width),
                height: Some(m.height),
                steps: Some(m.steps),
                guidance: Some(m.guidance),
                scheduler: Some(m.scheduler),
                scheduler_options: Some(m.scheduler_options),
                seed: Some(m.seed),
                num_images: None,
            }
        }
        None => GenerateParams::default(),
    };
    macro_rules! take {
        ($($f:ident),*) => { $( if args.$f.is_some() { params.$f = args.$f.clone(); } )* };
    }
    take!(
        prompt,
        negative_prompt,
        width,
        height,
        steps,
        guidance,
        scheduler,
        seed,
        num_images
    );
    args.xl.apply(&mut params);
    if !args.scheduler_option.is_empty() {
        let options = params
            .scheduler_options
            .get_or_insert_with(Default::default);
        for kv in &args.scheduler_option {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                Error::invalid("scheduler_option", format!("{kv:?} is not KEY=VALUE"))
            })?;
            let value = serde_json::from_str(v)
                .unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
            options.insert(k.trim().to_string(), value);
        }
        // `solver_order=2.0` is the integer 2, as over HTTP.
        crate::fields::integral_numbers(options);
    }
    if params.prompt.is_none() {
        return Err(Error::invalid("prompt", "required (or give --from-image)"));
    }
    let latents = args.latents.as_deref().map(load_latents).transpose()?;
    // No per-side cap on the command line beyond the area: the caller is the
    // operator, and sizes are checked (and memory bounded) all the same.
    let limits = Limits {
        max_pixels: args.max_pixels,
        max_side: args.max_pixels,
        ..Limits::default()
    };
    if let Some(dir) = args
        .output
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.is_dir())
    {
        return Err(Error::invalid(
            "output",
            format!("{}: no such directory", dir.display()),
        ));
    }

    let model = args.model.load()?;
    let req = params.validate(model.info(), &limits, latents)?;
    let scheduler = model.scheduler_config().resolve(req.scheduler)?;
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} steps, {elapsed} elapsed, ETA {eta}",
        )
        .expect("valid template"),
    );
    bar.set_message(format!("{} x{}", scheduler, req.num_images));
    let out = model.generate(&req, &mut |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64);
        true
    })?;
    bar.finish_and_clear();

    let images = to_rgb8(&out.images)?;
    let n = images.len();
    let mut written = Vec::with_capacity(n);
    for (i, (img, seed)) in images.iter().zip(&out.seeds).enumerate() {
        let meta = ImageMetadata::new(&req, scheduler, *seed, &model.info().source);
        let path = output_path(&args.output, i, n);
        let png = encode_png(img, Some(&meta))?;
        std::fs::write(&path, png).map_err(|e| Error::io(&path, e))?;
        written.push(path);
    }
    tracing::info!(
        text_encoder_s = out.timings.text_encoder,
        denoise_s = out.timings.denoise,
        vae_decode_s = out.timings.vae_decode,
        "generated {n} image(s)"
    );
    Ok(written)
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on.
    #[arg(long, env = "SDSERVE_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// Port; SageMaker's SAGEMAKER_BIND_TO_PORT wins when set.
    #[arg(long, env = "SDSERVE_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Where images and job records are kept: a folder, or s3://bucket/prefix
    /// (standard AWS environment for credentials, region and endpoint).
    #[arg(long, env = "SDSERVE_STORAGE", default_value = "./data")]
    pub storage: String,
    /// Base URL prefixed to image links served by this server (e.g. behind a
    /// proxy); empty gives relative links (`/files/...`).
    #[arg(long, env = "SDSERVE_PUBLIC_URL", default_value = "")]
    pub public_url: String,
    /// Origins allowed to call the API from a page hosted elsewhere,
    /// comma-separated (`*` for any); none: no CORS headers.
    #[arg(long, env = "SDSERVE_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origin: Vec<String>,
    /// Seconds a running job may go on after SIGTERM before it is interrupted
    /// (interrupted and queued jobs run again at the next start).
    #[arg(long, env = "SDSERVE_SHUTDOWN_GRACE", default_value_t = 20)]
    pub shutdown_grace: u64,
    /// Lifetime in seconds of presigned S3 image URLs.
    #[arg(long, env = "SDSERVE_PRESIGN_SECONDS", default_value_t = 3600)]
    pub presign_seconds: u64,
    /// Skip the one-step warm-up generation that measures step times for
    /// estimates before /ping turns 200.
    #[arg(long, env = "SDSERVE_NO_WARMUP")]
    pub no_warmup: bool,
    /// Most images one UNet batch may hold: queued jobs with the same size,
    /// steps, scheduler and guidance run together up to this (1: no batching).
    /// Each image is the same as when its job runs alone. Default: 4 on GPUs,
    /// 1 on CPU (where larger batches measured no faster; see benches/README.md).
    #[arg(long, env = "SDSERVE_MAX_BATCH_IMAGES")]
    pub max_batch_images: Option<usize>,
    /// Jobs that may wait for the model at once; more are refused with 503/429.
    #[arg(long, env = "SDSERVE_QUEUE_CAPACITY", default_value_t = 32)]
    pub queue_capacity: usize,
    /// Largest width x height accepted.
    #[arg(long, env = "SDSERVE_MAX_PIXELS", default_value_t = Limits::default().max_pixels)]
    pub max_pixels: usize,
    /// Largest width or height accepted.
    #[arg(long, env = "SDSERVE_MAX_SIDE", default_value_t = Limits::default().max_side)]
    pub max_side: usize,
    /// Most denoising steps one request may ask for.
    #[arg(long, env = "SDSERVE_MAX_STEPS", default_value_t = Limits::default().max_steps)]
    pub max_steps: usize,
    /// Most images one request may ask for.
    #[arg(long, env = "SDSERVE_MAX_IMAGES", default_value_t = Limits::default().max_images)]
    pub max_images: usize,
    /// Most working memory (MiB) one request may need beyond the weights; a
    /// request estimated to need more is refused (default: half the memory of
    /// the machine or container).
    #[arg(long, env = "SDSERVE_MAX_REQUEST_MIB")]
    pub max_request_mib: Option<u64>,
    /// Where SageMaker extracts model.tar.gz; used when it holds a model.
    #[arg(
        long,
        env = "SDSERVE_SAGEMAKER_MODEL_DIR",
        default_value = "/opt/ml/model"
    )]
    pub sagemaker_model_dir: PathBuf,
}

impl ServeArgs {
    /// SageMaker's model folder when it holds a model, else `--model`.
    pub fn model_source(&self) -> Result<ModelSource> {
        if self.sagemaker_model_dir.join("model_index.json").is_file() {
            return Ok(ModelSource::Local(self.sagemaker_model_dir.clone()));
        }
        self.model.source()?.ok_or_else(|| {
            Error::invalid(
                "model",
                format!(
                    "no model: {} has no model_index.json and neither --model nor SDSERVE_MODEL is set",
                    self.sagemaker_model_dir.display()
                ),
            )
        })
    }

    /// The request limits the flags set.
    pub fn limits(&self) -> Result<Limits> {
        for (flag, v) in [
            ("max-pixels", self.max_pixels),
            ("max-side", self.max_side),
            ("max-steps", self.max_steps),
            ("max-images", self.max_images),
        ] {
            if v == 0 {
                return Err(Error::invalid(flag, "must be at least 1"));
            }
        }
        let defaults = Limits::default();
        Ok(Limits {
            max_pixels: self.max_pixels,
            max_side: self.max_side,
            max_steps: self.max_steps,
            max_images: self.max_images,
            max_request_bytes: match self.max_request_mib {
                Some(0) => return Err(Error::invalid("max-request-mib", "must be at least 1")),
                Some(m) => m.saturating_mul(1 << 20),
                None => defaults.max_request_bytes,
            },
            ..defaults
        })
    }

    /// The port to bind: `SAGEMAKER_BIND_TO_PORT` if set, else `--port`.
    pub fn port(&self) -> Result<u16> {
        match std::env::var("SAGEMAKER_BIND_TO_PORT") {
            Ok(p) if !p.trim().is_empty() => p.trim().parse().map_err(|_| {
                Error::invalid(
                    "port",
                    format!("SAGEMAKER_BIND_TO_PORT={p:?} is not a port number"),
                )
            }),
            _ => Ok(self.port),
        }
    }
}

/// Runs the HTTP server until SIGTERM or Ctrl-C. The listener is bound before the
/// model loads, so `/ping` answers (503, then 200) from the first moment.
pub fn run_serve(args: &ServeArgs) -> Result<()> {
    let source = args.model_source()?;
    let opts = args.model.load_options()?;
    let port = args.port()?;
    let limits = args.limits()?;
    let storage = crate::storage::Storage::open(&args.storage)?;
    let max_batch_images = match args.max_batch_images {
        Some(0) => return Err(Error::invalid("max-batch-images", "must be at least 1")),
        Some(n) => n,
        None if opts.device.is_cpu() => 1,
        None => 4,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Startup(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async move {
        let addr = format!("{}:{port}", args.host);
        let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| {
            Error::Startup(format!("cannot listen on {addr} (--host, --port): {e}"))
        })?;
        tracing::info!("images and job records in {storage:?}");
        tracing::info!(
            "listening on http://{}",
            listener.local_addr().map_err(|e| Error::io(&addr, e))?
        );
        let engine = crate::engine::Engine::start(
            move || load_model(&source, &opts),
            crate::engine::EngineConfig {
                queue_capacity: args.queue_capacity,
                warmup: !args.no_warmup,
                max_batch_images,
                metrics: Default::default(),
            },
        );
        let jobs = crate::jobs::Jobs::new(
            engine.clone(),
            storage,
            limits,
            crate::jobs::JobsConfig {
                public_url: args.public_url.trim_end_matches('/').to_string(),
                presign_expiry: std::time::Duration::from_secs(args.presign_seconds),
            },
        );
        let recovering = jobs.clone();
        tokio::spawn(async move {
            match recovering.recover().await {
                Ok(0) => {}
                Ok(n) => tracing::info!("re-queued {n} unfinished job(s) from storage"),
                Err(e) => tracing::error!("reading stored jobs failed: {e}"),
            }
        });
        let app = crate::http::router(crate::http::AppState {
            engine,
            jobs: jobs.clone(),
            limits,
            cors_origins: args.cors_origin.clone(),
        });
        let grace = std::time::Duration::from_secs(args.shutdown_grace);
        crate::http::server::serve(listener, app, async move {
            shutdown_signal().await;
            jobs.shutdown(grace).await;
        })
        .await;
        tracing::info!("shut down");
        Ok(())
    })
}

/// Resolves on SIGTERM (what SageMaker and Kubernetes send) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received: finishing the running job, keeping queued ones");
}

pub fn run_download(args: &DownloadArgs) -> Result<PathBuf> {
    let source = ModelSource::Hub {
        repo: args.repo.clone(),
        revision: args.revision.clone().unwrap_or_else(|| "main".into()),
    };
    source.resolve(args.fp16)
}
