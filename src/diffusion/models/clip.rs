//! CLIP text encoder: transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`
//! (`models/clip/modeling_clip.py`, `CLIPTextTransformer.forward`), returning what the
//! pipelines use (Radford et al. 2021, CLIP): `last_hidden_state` for SD 1.x/2.x
//! (`StableDiffusionPipeline.encode_prompt`), the penultimate layer's hidden state and
//! the projected pooled state for SDXL (`StableDiffusionXLPipeline.encode_prompt`).
//!
//! Written here rather than taken from candle-transformers because its config
//! cannot be built from JSON and its causal mask breaks for batches > 1. Loads
//! weights saved with or without the older `text_model.` prefix.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};

use crate::diffusion::loading::config::{Activation, ClipTextConfig};
use crate::error::Result;

/// The activation `act` applied to `xs`, as transformers' `ACT2FN` computes it.
fn activate(act: Activation, xs: &Tensor) -> candle_core::Result<Tensor> {
    match act {
        Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
        Activation::Gelu => xs.gelu_erf(),
        Activation::GeluTanh => xs.gelu(),
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, c: &ClipTextConfig) -> candle_core::Result<Self> {
        let h = c.hidden_size;
        Ok(Self {
            q_proj: candle_nn::linear(h, h, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(h, h, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(h, h, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear(h, h, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
            head_dim: h / c.num_attention_heads,
        })
    }

    /// `mask`: additive [seq, seq] causal mask.
    fn forward(&self, xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, seq, hidden) = xs.dims3()?;
        let shape = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, seq, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = shape((self.q_proj.forward(xs)? * scale)?)?;
        let k = shape(self.k_proj.forward(xs)?)?;
        let v = shape(self.v_proj.forward(xs)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, seq, hidden))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, c: &ClipTextConfig, act: Activation) -> candle_core::Result<Self> {
        let (h, eps) = (c.hidden_size, c.layer_norm_eps);
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(h, eps, vb.pp("layer_norm1"))?,
            self_attn: Attention::new(vb.pp("self_attn"), c)?,
            layer_norm2: candle_nn::layer_norm(h, eps, vb.pp("layer_norm2"))?,
            fc1: candle_nn::linear(h, c.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: candle_nn::linear(c.intermediate_size, h, vb.pp("mlp").pp("fc2"))?,
            act,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let residual = xs;
        let xs = self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, mask)?;
        let xs = (residual + xs)?;
        let h = activate(
            self.act,
            &self.fc1.forward(&self.layer_norm2.forward(&xs)?)?,
        )?;
        &xs + self.fc2.forward(&h)?
    }
}

/// What one pass of the encoder gives, each `[batch, ...]`.
#[derive(Debug)]
pub struct ClipOutput {
    /// After the final layer norm: `[batch, seq, hidden]`.
    pub last_hidden_state: Tensor,
    /// `hidden_states[-2]`: the input of the last layer, no layer norm.
    pub penultimate: Tensor,
    /// `text_embeds`: `text_projection` of the final-normed state at each row's
    /// pooling position, `[batch, projection_dim]` (with a projection head only).
    pub text_embeds: Option<Tensor>,
}

/// The CLIP text transformer of a Stable Diffusion `text_encoder/` folder.
#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    /// `CLIPTextModelWithProjection.text_projection` (no bias).
    text_projection: Option<Linear>,
    max_positions: usize,
    eos_token_id: u32,
}

impl ClipTextModel {
    /// `vb` points at the root of `text_encoder/model.safetensors`; the
    /// `text_model.` prefix of older checkpoints is detected. `with_projection`:
    /// a `CLIPTextModelWithProjection`, whose `text_projection` sits beside
    /// `text_model`.
    pub fn new(vb: VarBuilder, c: &ClipTextConfig, with_projection: bool) -> Result<Self> {
        let text_projection = if with_projection {
            Some(candle_nn::linear_no_bias(
                c.hidden_size,
                c.projection_dim,
                vb.pp("text_projection"),
            )?)
        } else {
            None
        };
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let act = Activation::parse(&c.hidden_act).ok_or_else(|| {
            candle_core::Error::Msg(format!("unsupported hidden_act {:?}", c.hidden_act))
        })?;
        let emb = vb.pp("embeddings");
        let token_embedding =
            candle_nn::embedding(c.vocab_size, c.hidden_size, emb.pp("token_embedding"))?;
        let position_embedding = candle_nn::embedding(
            c.max_position_embeddings,
            c.hidden_size,
            emb.pp("position_embedding"),
        )?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::new(vb.pp("encoder").pp("layers").pp(i), c, act))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_layer_norm =
            candle_nn::layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("final_layer_norm"))?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            max_positions: c.max_position_embeddings,
            eos_token_id: c.eos_token_id,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// `ids`: [batch, seq] u32 token ids → last_hidden_state [batch, seq, hidden].
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.forward_all(ids)?.last_hidden_state)
    }

    /// `ids`: [batch, seq] u32 token ids → every output a pipeline reads.
    pub fn forward_all(&self, ids: &Tensor) -> Result<ClipOutput> {
        let (_, seq) = ids.dims2()?;
        if self.layers.is_empty() {
            return Err(crate::error::Error::Internal(
                "CLIP text encoder without layers".into(),
            ));
        }
        let device = ids.device();
        let positions = Tensor::arange(0u32, seq as u32, device)?;
        let xs = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(seq, xs.dtype(), device)?;
        let mut xs = xs;
        let (last, rest) = self.layers.split_last().expect("checked above");
        for layer in rest {
            xs = layer.forward(&xs, &mask)?;
        }
        let penultimate = xs.clone();
        let last_hidden_state = self.final_layer_norm.forward(&last.forward(&xs, &mask)?)?;
        let text_embeds = match &self.text_projection {
            Some(proj) => Some(proj.forward(&self.pooled(&last_hidden_state, ids)?)?),
            None => None,
        };
        Ok(ClipOutput {
            last_hidden_state,
            penultimate,
            text_embeds,
        })
    }

    /// `pooled_output` of `CLIPTextTransformer.forward`: each row's state at its
    /// pooling position, `[batch, hidden]`.
    fn pooled(&self, states: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let rows: Vec<Vec<u32>> = ids.to_vec2()?;
        let picked = rows
            .iter()
            .enumerate()
            .map(|(b, row)| {
                let at = pooling_position(row, self.eos_token_id);
                states.narrow(0, b, 1)?.narrow(1, at, 1)?.squeeze(1)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&picked, 0)?)
    }
}

/// Where transformers pools a row of ids: with `eos_token_id == 2` (the legacy
/// configs every SD repo ships) `input_ids.argmax(-1)`, the first largest id
/// (`<|endoftext|>` is the largest in CLIP's vocabulary); otherwise the first
/// `eos_token_id`.
fn pooling_position(row: &[u32], eos_token_id: u32) -> usize {
    if eos_token_id == 2 {
        let max = row.iter().copied().max().unwrap_or(0);
        row.iter().position(|&id| id == max).unwrap_or(0)
    } else {
        row.iter().position(|&id| id == eos_token_id).unwrap_or(0)
    }
}

/// Additive causal mask [seq, seq]: 0 on and below the diagonal, the dtype's
/// minimum above it (transformers' `_create_4d_causal_attention_mask`).
fn causal_mask(seq: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::MIN } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq, seq), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_at_the_first_largest_id_or_the_first_eos() {
        // SD 1.x pads with <|endoftext|> (49407): the first one is the EOS.
        assert_eq!(pooling_position(&[49406, 320, 49407, 49407], 2), 2);
        // SDXL's tokenizer_2 pads with "!" (0).
        assert_eq!(pooling_position(&[49406, 320, 1125, 49407, 0, 0], 2), 3);
        assert_eq!(pooling_position(&[49406, 7, 49407, 7], 7), 1);
    }

    #[test]
    fn mask_is_causal() {
        let m = causal_mask(3, DType::F32, &Device::Cpu).unwrap();
        let v: Vec<Vec<f32>> = m.to_vec2().unwrap();
        assert_eq!(v[0][0], 0.0);
        assert_eq!(v[0][1], f32::MIN);
        assert_eq!(v[2][1], 0.0);
    }
}
