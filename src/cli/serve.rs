//! `sdserve serve`: the engine, the job service and the HTTP server,
//! assembled from flags and environment variables.

use std::path::PathBuf;

use clap::Args;

use super::ModelArgs;
use crate::diffusion::loading::hub::ModelSource;
use crate::diffusion::pipelines::{SamplingDefaults, load_model};
use crate::error::{Error, Result};
use crate::request::Limits;

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
    /// Steps a request that gives none runs (and the page and /info offer)
    /// [default: the model's: 1 for Turbo folders, 4 for LCM, else 30].
    #[arg(long, env = "SDSERVE_DEFAULT_STEPS")]
    pub default_steps: Option<usize>,
    /// Guidance scale a request that gives none runs [default: the model's:
    /// 7.5 for SD 1.x/2.x, 5 for SDXL, 0 for Turbo folders, 8.5 for LCM UNets].
    #[arg(long, env = "SDSERVE_DEFAULT_GUIDANCE")]
    pub default_guidance: Option<f64>,
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

    /// `--default-steps` and `--default-guidance`, checked.
    pub fn default_overrides(&self) -> Result<DefaultOverrides> {
        if let Some(n) = self.default_steps {
            if n == 0 {
                return Err(Error::invalid("default-steps", "must be at least 1"));
            }
            if n > self.max_steps {
                return Err(Error::invalid(
                    "default-steps",
                    format!("{n} is over --max-steps {}", self.max_steps),
                ));
            }
        }
        if let Some(g) = self.default_guidance
            && (!g.is_finite() || !(0.0..=100.0).contains(&g))
        {
            return Err(Error::invalid(
                "default-guidance",
                format!("{g} is outside 0..=100"),
            ));
        }
        Ok(DefaultOverrides {
            steps: self.default_steps,
            guidance: self.default_guidance,
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

/// A server's replacements for the model's own sampling defaults.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultOverrides {
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
}

impl DefaultOverrides {
    pub fn apply(self, model: SamplingDefaults) -> SamplingDefaults {
        SamplingDefaults {
            steps: self.steps.unwrap_or(model.steps),
            guidance: self.guidance.unwrap_or(model.guidance),
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
    let overrides = args.default_overrides()?;
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
            move || {
                let mut model = load_model(&source, &opts)?;
                let defaults = overrides.apply(model.info().defaults);
                if overrides.steps.is_some() {
                    // Every request that leaves its steps out would be refused.
                    let kind = crate::diffusion::schedulers::SchedulerKind::Default;
                    model
                        .scheduler(kind, &Default::default(), defaults.steps)
                        .map_err(|e| {
                            Error::invalid(
                                "default-steps",
                                format!("does not fit the model's scheduler: {e}"),
                            )
                        })?;
                }
                model.set_defaults(defaults);
                Ok(model)
            },
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
