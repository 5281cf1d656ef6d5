//! SDXL's added conditioning: diffusers `UNet2DConditionModel.get_aug_embed` for
//! `addition_embed_type == "text_time"`: every micro-conditioning id (original
//! size, crop corner, target size) through `add_time_proj` (a sinusoidal
//! `Timesteps`), concatenated after the pooled text embedding, through the
//! `add_embedding` MLP (`TimestepEmbedding`), added to the timestep embedding.
//! Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution
//! Image Synthesis", section 2.2.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::plan::TextTimePlan;
use super::timestep_embeddings;
use crate::diffusion::layers::linear::{Linear, linear};

/// What the UNet is conditioned on beyond the text states, one row per sample row.
#[derive(Debug, Clone)]
pub struct AddedConditioning {
    /// `text_embeds`: the pooled, projected text embedding `[rows, projection_dim]`.
    pub text_embeds: Tensor,
    /// `time_ids`: `[rows, n]` (SDXL base: original h, w, crop top, left, target h, w).
    pub time_ids: Tensor,
}

/// `add_time_proj` + `add_embedding`.
#[derive(Debug)]
pub(super) struct AddEmbedding {
    plan: TextTimePlan,
    linear_1: Linear,
    linear_2: Linear,
    flip_sin_to_cos: bool,
    freq_shift: f64,
}

impl AddEmbedding {
    pub(super) fn new(
        vb: VarBuilder,
        plan: TextTimePlan,
        temb_dim: usize,
        flip_sin_to_cos: bool,
        freq_shift: f64,
    ) -> Result<Self> {
        Ok(Self {
            plan,
            linear_1: linear(plan.input_dim, temb_dim, vb.pp("linear_1"))?,
            linear_2: linear(temb_dim, temb_dim, vb.pp("linear_2"))?,
            flip_sin_to_cos,
            freq_shift,
        })
    }

    /// `aug_emb` `[rows, temb_dim]` in `dtype`.
    pub(super) fn forward(&self, added: &AddedConditioning, dtype: DType) -> Result<Tensor> {
        let (rows, ids_per_row) = added.time_ids.dims2()?;
        let (text_rows, text_dim) = added.text_embeds.dims2()?;
        let expected = text_dim + ids_per_row * self.plan.time_embed_dim;
        if text_rows != rows || expected != self.plan.input_dim {
            candle_core::bail!(
                "added conditioning: {text_rows} text_embeds rows of {text_dim} and {rows} rows of \
                 {ids_per_row} time ids give {expected} features; the UNet's add_embedding takes \
                 {} (projection_class_embeddings_input_dim)",
                self.plan.input_dim
            );
        }
        // `add_time_proj(time_ids.flatten())` in f32, reshaped to one row per sample.
        let ids: Vec<f32> = added
            .time_ids
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let ids: Vec<f64> = ids.into_iter().map(f64::from).collect();
        let time_embeds = timestep_embeddings(
            &ids,
            self.plan.time_embed_dim,
            self.flip_sin_to_cos,
            self.freq_shift,
            added.time_ids.device(),
        )?
        .reshape((rows, ids_per_row * self.plan.time_embed_dim))?;
        let add_embeds = Tensor::cat(&[&added.text_embeds.to_dtype(DType::F32)?, &time_embeds], 1)?
            .to_dtype(dtype)?;
        self.linear_2
            .forward(&self.linear_1.forward(&add_embeds)?.silu()?)
    }
}
