//! sdserve: a self-hosted Stable Diffusion text-to-image service on candle.
//!
//! The library holds everything the `sdserve` binary does, so integration
//! tests and benchmarks drive the same code paths:
//! - [`diffusion`]: loading unmodified diffusers model folders and running the
//!   text-to-image pipeline (tokenizer, CLIP text encoder, UNet, schedulers, VAE).
//! - [`kernels`]: CPU compute (convolution, attention, GroupNorm, GEGLU, bf16
//!   matrix multiply) as candle ops, knowing nothing of diffusion.
//! - [`output`]: images as PNG (with the parameters that made them), JPEG, WebP.
//! - [`request`]: the one validated generation request every front door builds;
//!   [`fields`]: how the front doors' JSON fields are read and constrained.
//! - [`engine`]: the model's worker thread, its bounded queue and job tickets.
//! - [`jobs`], [`storage`], [`styles`]: the public job API's records, images and presets.
//! - [`http`]: the axum server (SageMaker contract, job API, page, metrics, OpenAPI).
//! - [`cli`]: the command-line interface.

pub mod alloc;
pub mod cli;
pub mod diffusion;
pub mod edit;
pub mod engine;
pub mod error;
pub mod fields;
pub mod http;
pub mod jobs;
pub mod kernels;
pub mod metrics;
pub mod output;
pub mod request;
pub mod storage;
pub mod styles;

pub use error::{Error, Result};
