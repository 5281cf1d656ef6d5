//! One CLIP tokenizer and the text encoder it feeds, as every family's
//! `encode_prompt` uses them.

use candle_core::{Device, Tensor};

use crate::diffusion::loading::tokenizer::ClipTokenizer;
use crate::diffusion::models::clip::{ClipOutput, ClipTextModel};
use crate::error::Result;

/// A tokenizer and the CLIP text encoder it feeds.
#[derive(Debug)]
pub struct ClipText {
    pub(super) tokenizer: ClipTokenizer,
    pub(super) encoder: ClipTextModel,
}

impl ClipText {
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// Token ids `[len(texts), max_len]` on `device` (padded, truncated: the
    /// tokenizer call of `encode_prompt`).
    pub fn tokenize(&self, texts: &[&str], device: &Device) -> Result<Tensor> {
        let max_len = self.tokenizer.max_len();
        let mut ids = Vec::with_capacity(texts.len() * max_len);
        for t in texts {
            ids.extend(self.tokenizer.encode(t)?.0);
        }
        Ok(Tensor::from_vec(ids, (texts.len(), max_len), device)?)
    }

    /// Every output of the encoder for each text.
    pub fn encode(&self, texts: &[&str], device: &Device) -> Result<ClipOutput> {
        self.encoder.forward_all(&self.tokenize(texts, device)?)
    }
}
