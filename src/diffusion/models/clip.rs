//! CLIP text encoder: transformers' `CLIPTextModel` (`models/clip/modeling_clip.py`,
//! `CLIPTextTransformer.forward`), returning `last_hidden_state` as
//! `StableDiffusionPipeline.encode_prompt` uses it (Radford et al. 2021, CLIP).
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

/// The CLIP text transformer of a Stable Diffusion `text_encoder/` folder.
#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    max_positions: usize,
}

impl ClipTextModel {
    /// `vb` points at the root of `text_encoder/model.safetensors`; the
    /// `text_model.` prefix of older checkpoints is detected.
    pub fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
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
            max_positions: c.max_position_embeddings,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// `ids`: [batch, seq] u32 token ids → last_hidden_state [batch, seq, hidden].
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, seq) = ids.dims2()?;
        let device = ids.device();
        let positions = Tensor::arange(0u32, seq as u32, device)?;
        let xs = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(seq, xs.dtype(), device)?;
        let mut xs = xs;
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask)?;
        }
        Ok(self.final_layer_norm.forward(&xs)?)
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
    fn mask_is_causal() {
        let m = causal_mask(3, DType::F32, &Device::Cpu).unwrap();
        let v: Vec<Vec<f32>> = m.to_vec2().unwrap();
        assert_eq!(v[0][0], 0.0);
        assert_eq!(v[0][1], f32::MIN);
        assert_eq!(v[2][1], 0.0);
    }
}
