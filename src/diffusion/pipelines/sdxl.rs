//! SDXL's prompt encoding and added conditioning: diffusers'
//! `StableDiffusionXLPipeline.encode_prompt` and the `add_text_embeds` /
//! `add_time_ids` of its `__call__` (`pipelines/stable_diffusion_xl/
//! pipeline_stable_diffusion_xl.py`). The denoising loop, the schedulers and
//! the VAE are the ones every family shares. Podell et al. 2023, "SDXL".

use candle_core::{D, DType, Device, Tensor};

use super::Conditioning;
use super::clip_text::ClipText;
use crate::diffusion::models::unet::AddedConditioning;
use crate::diffusion::params::{GenerateRequest, TimeIdRule};
use crate::error::{Error, Result};

/// SDXL's text encoders, each with its tokenizer: `text_encoder`
/// (CLIPTextModel) and `text_encoder_2` (CLIPTextModelWithProjection); the
/// refiner has only the second.
#[derive(Debug)]
pub struct XlText {
    /// One or two, `text_encoder_2` last.
    pub(super) encoders: Vec<ClipText>,
    /// `model_index.json`'s `force_zeros_for_empty_prompt`: with no negative
    /// prompt given, the unconditional rows are zeros rather than `""` encoded.
    pub(super) force_zeros_for_empty_prompt: bool,
    /// `model_index.json`'s `requires_aesthetics_score` (the refiner): aesthetic
    /// scores in the time ids instead of the target size.
    pub(super) requires_aesthetics_score: bool,
}

/// Python's `a or b` for optional strings: an empty string counts as absent.
fn or<'a>(a: Option<&'a str>, b: &'a str) -> &'a str {
    a.filter(|s| !s.is_empty()).unwrap_or(b)
}

impl XlText {
    /// `(prompt_embeds, pooled)` of text pairs: row `i` is `firsts[i]` through
    /// `text_encoder` and `seconds[i]` through `text_encoder_2`, both
    /// penultimate hidden states (`hidden_states[-2]`) concatenated on the
    /// feature axis; the pooled embedding is `text_encoder_2`'s `text_embeds`.
    /// With only `text_encoder_2` (the refiner) the first prompts go to it, as
    /// `encode_prompt`'s `zip(prompts, tokenizers, text_encoders)` pairs them.
    fn encode(
        &self,
        firsts: &[&str],
        seconds: &[&str],
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let mut states = Vec::with_capacity(2);
        let mut pooled = None;
        for (encoder, texts) in self.encoders.iter().zip([firsts, seconds]) {
            let out = encoder.encode(texts, device)?;
            states.push(out.penultimate);
            pooled = out.text_embeds;
        }
        let text = Tensor::cat(&states, D::Minus1)?;
        let pooled =
            pooled.ok_or_else(|| Error::Internal("text_encoder_2 has no projection".into()))?;
        Ok((text, pooled))
    }

    /// One request's conditioning, rows `[uncond × n, cond × n]` under guidance
    /// (`torch.cat([negative, positive])` of `__call__`), `[cond × n]` without.
    pub fn conditioning(
        &self,
        req: &GenerateRequest,
        guided: bool,
        device: &Device,
    ) -> Result<Conditioning> {
        let prompt_2 = or(req.prompt_2.as_deref(), &req.prompt);
        let zero_negative = req.negative_prompt.is_none() && self.force_zeros_for_empty_prompt;
        let encode_negative = guided && !zero_negative;
        let (text, pooled) = if encode_negative {
            let negative = or(req.negative_prompt.as_deref(), "");
            let negative_2 = or(req.negative_prompt_2.as_deref(), negative);
            self.encode(&[negative, &req.prompt], &[negative_2, prompt_2], device)?
        } else {
            self.encode(&[&req.prompt], &[prompt_2], device)?
        };
        let rule = match (self.requires_aesthetics_score, req.init.is_some()) {
            (true, _) => TimeIdRule::Aesthetic,
            (false, true) => TimeIdRule::Edit,
            (false, false) => TimeIdRule::TextToImage,
        };
        let (positive_ids, negative_ids) = req.micro.time_ids(req.height, req.width, rule);
        let ids = |v: Vec<f32>| {
            let n = v.len();
            Tensor::from_vec(v, (1, n), device)
        };
        let (text, pooled, time_ids) = if !guided {
            (text, pooled, ids(positive_ids)?)
        } else if encode_negative {
            let time_ids = Tensor::cat(&[ids(negative_ids)?, ids(positive_ids)?], 0)?;
            (text, pooled, time_ids)
        } else {
            // `torch.zeros_like(prompt_embeds)` and of the pooled embedding.
            let text = Tensor::cat(&[&text.zeros_like()?, &text], 0)?;
            let pooled = Tensor::cat(&[&pooled.zeros_like()?, &pooled], 0)?;
            let time_ids = Tensor::cat(&[ids(negative_ids)?, ids(positive_ids)?], 0)?;
            (text, pooled, time_ids)
        };
        Conditioning {
            text,
            added: Some(AddedConditioning {
                text_embeds: pooled,
                time_ids: time_ids.to_dtype(DType::F32)?,
            }),
            timestep_cond: None,
        }
        .repeat_rows(req.num_images)
    }
}
