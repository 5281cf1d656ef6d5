//! From prompts to what the UNet is conditioned on: the text encoders of a
//! model family ([`TextEncoders`]), built from CLIP tokenizer and encoder
//! pairs ([`ClipText`]): SD 1.x/2.x's one encoder (diffusers'
//! `StableDiffusionPipeline.encode_prompt`), SDXL's two ([`super::sdxl`]).

use candle_core::Device;

use super::Conditioning;
pub use super::clip_text::ClipText;
use super::sdxl::XlText;
use crate::diffusion::params::GenerateRequest;
use crate::error::Result;

/// The text encoders of the loaded model's family.
// One per loaded model, never moved in a loop: the size difference is harmless.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum TextEncoders {
    /// SD 1.x/2.x: `last_hidden_state` of one CLIP text encoder.
    Clip(ClipText),
    /// SDXL: two encoders' penultimate states, the second's pooled projection.
    Xl(XlText),
}

impl TextEncoders {
    /// The first tokenizer and encoder (SDXL's `tokenizer` / `text_encoder`;
    /// the refiner's only, `text_encoder_2`).
    pub fn first(&self) -> &ClipText {
        match self {
            Self::Clip(c) => c,
            Self::Xl(x) => &x.encoders[0],
        }
    }

    /// The conditioning of one request's `num_images` images:
    /// `[uncond × n, cond × n]` rows under guidance, `[cond × n]` without.
    pub fn conditioning(
        &self,
        req: &GenerateRequest,
        guided: bool,
        device: &Device,
    ) -> Result<Conditioning> {
        match self {
            Self::Clip(c) => {
                let negative = req.negative_prompt.as_deref().unwrap_or("");
                let texts: Vec<&str> = if guided {
                    vec![negative, &req.prompt]
                } else {
                    vec![&req.prompt]
                };
                let text = c.encoder.forward(&c.tokenize(&texts, device)?)?;
                Conditioning::text(text).repeat_rows(req.num_images)
            }
            Self::Xl(x) => x.conditioning(req, guided, device),
        }
    }
}
