//! sdserve: a self-hosted Stable Diffusion text-to-image service on candle.
//!
//! The library holds everything the `sdserve` binary does, so integration
//! tests and benchmarks drive the same code paths:
//! - [`diffusion`]: loading unmodified diffusers model folders and running the
//!   text-to-image pipeline (tokenizer, CLIP text encoder, UNet, schedulers, VAE).
//! - [`request`]: the one validated generation request every front door builds.
//! - [`cli`]: the command-line interface.

pub mod cli;
pub mod diffusion;
pub mod engine;
pub mod error;
pub mod http;
pub mod request;

pub use error::{Error, Result};
