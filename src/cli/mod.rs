//! Command-line interface: the flags every command shares (which model, on
//! what device), `sdserve download`, and how errors are shown; `sdserve
//! generate` in [`generate`], `sdserve serve` (assembling the engine, job
//! service and HTTP server) in [`serve`].

mod generate;
mod serve;

use std::path::PathBuf;

use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};

pub use generate::{GenerateArgs, XlArgs, output_path, run_generate};
pub use serve::{DefaultOverrides, ServeArgs, run_serve};

use crate::diffusion::loading::hub::ModelSource;
use crate::diffusion::pipelines::{LoadOptions, StableDiffusion, device_from_name, load_model};
use crate::error::{Error, Result};

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
    /// A diffusers model folder, a Hugging Face hub repo id (org/name), or a
    /// single-file .safetensors checkpoint (original layout; needs --config).
    #[arg(long, env = "SDSERVE_MODEL")]
    pub model: Option<String>,
    /// For a single-file --model: the diffusers folder of its family whose
    /// configs and tokenizers describe it (its weights are never read).
    #[arg(long, env = "SDSERVE_MODEL_CONFIG", value_name = "DIR")]
    pub config: Option<std::path::PathBuf>,
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
        let source = self
            .model
            .as_deref()
            .map(|m| ModelSource::parse(m, self.revision.as_deref()))
            .transpose()?;
        match (source, &self.config) {
            (Some(ModelSource::SingleFile { file, .. }), config) => {
                Ok(Some(ModelSource::SingleFile {
                    file,
                    config: config.clone(),
                }))
            }
            (_, Some(_)) => Err(Error::invalid(
                "config",
                "only a single-file --model (.safetensors checkpoint) takes --config",
            )),
            (source, None) => Ok(source),
        }
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
            // Request fields are named like the flags, except these two; an
            // environment variable (upper case) is named as it is.
            let flag = match field.as_str() {
                "scheduler_options" => "--scheduler-option".to_string(),
                "mask_image" => "--mask".to_string(),
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

pub fn run_download(args: &DownloadArgs) -> Result<PathBuf> {
    let source = ModelSource::Hub {
        repo: args.repo.clone(),
        revision: args.revision.clone().unwrap_or_else(|| "main".into()),
    };
    source.resolve(args.fp16)
}
