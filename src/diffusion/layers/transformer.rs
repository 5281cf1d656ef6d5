//! The attention blocks of diffusers 0.42.1, operation for operation:
//! [`Transformer2D`] (the continuous-input path of
//! `models/transformers/transformer_2d.py` `Transformer2DModel`),
//! [`BasicTransformerBlock`] and [`FeedForward`] (GEGLU, Shazeer 2020, "GLU
//! Variants Improve Transformer": `models/attention.py`, `models/activations.py`
//! `GEGLU` with the exact erf GELU), and [`Attention`]
//! (`models/attention_processor.py` run by `AttnProcessor2_0`: scaled
//! dot-product attention, Vaswani et al. 2017, computed by
//! [`crate::kernels::attention`] without ever holding the whole score matrix).
//! Every tensor is requested under diffusers' `state_dict` name and shape.

use candle_core::{Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use super::linear::{Linear, linear, linear_no_bias};
use super::norm::{GroupNorm, group_norm};
use super::{attention, geglu, packs_bf16, parameters};

/// diffusers `Attention` (no bias on q/k/v, bias on `to_out.0`) run the way
/// `AttnProcessor2_0` runs it: `softmax(q kᵀ / √d) v` per head, then `to_out`.
#[derive(Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    upcast: bool,
}

impl Attention {
    /// `cross_attention_dim: None` is self-attention. `upcast` is diffusers'
    /// `upcast_attention`: in f16/bf16, `q kᵀ` is computed in f32 (as diffusers'
    /// `Attention.get_attention_scores` does). The softmax is always computed in f32.
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        cross_attention_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let context_dim = cross_attention_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: linear(inner, query_dim, vb.pp("to_out.0"))?,
            heads,
            head_dim,
            upcast,
        })
    }

    /// `xs`: `[batch, tokens, query_dim]`; `context`: `[batch, ctx_tokens, cross_dim]`,
    /// `None` for self-attention.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = attention(
            &self.to_q.forward(xs)?,
            &self.to_k.forward(context)?,
            &self.to_v.forward(context)?,
            self.heads,
            scale,
            self.upcast,
            self.to_q.is_bf16(),
        )?;
        self.to_out.forward(&out)
    }
}

/// diffusers `FeedForward(activation_fn="geglu")`: `net.0` is `GEGLU` (one linear to
/// `2 × inner`, split into value and gate, `value * gelu(gate)` with the exact erf GELU),
/// `net.2` the output linear. The `net.0.proj` weight is viewed as its two halves so the
/// value and gate come out of two matmuls contiguous.
#[derive(Debug)]
pub struct FeedForward {
    proj: Geglu,
    out: Linear,
}

/// `net.0`: two halves (f32, candle's GELU), or in mixed precision one bf16 linear whose
/// output holds both, gated by [`crate::kernels::activations::geglu`].
#[derive(Debug)]
enum Geglu {
    Halves { value: Linear, gate: Linear },
    Fused(Linear),
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        let proj = parameters(&vb.pp("net.0.proj"));
        let w = proj.get((2 * inner, dim), "weight")?;
        let b = proj.get(2 * inner, "bias")?;
        let proj = if packs_bf16(&vb) {
            Geglu::Fused(Linear::new(w, Some(b), true)?)
        } else {
            let half = |i: usize| -> Result<Linear> {
                Linear::new(
                    w.narrow(0, i * inner, inner)?,
                    Some(b.narrow(0, i * inner, inner)?),
                    false,
                )
            };
            Geglu::Halves {
                value: half(0)?,
                gate: half(1)?,
            }
        };
        Ok(Self {
            proj,
            out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = match &self.proj {
            Geglu::Halves { value, gate } => {
                (value.forward(xs)? * gate.forward(xs)?.gelu_erf()?)?
            }
            Geglu::Fused(proj) => geglu(&proj.forward(xs)?)?,
        };
        self.out.forward(&h)
    }
}

/// diffusers `BasicTransformerBlock` with `norm_type="layer_norm"`: self-attention,
/// cross-attention on the text embeddings, GEGLU feed-forward, each pre-normed and residual.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

/// `Transformer2DModel`'s `norm_eps` default; the UNet does not pass its own.
const LAYER_NORM_EPS: f64 = 1e-5;

impl BasicTransformerBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_attention_dim: usize,
        upcast: bool,
    ) -> Result<Self> {
        let ln = |name: &str| candle_nn::layer_norm(dim, LAYER_NORM_EPS, parameters(&vb.pp(name)));
        Ok(Self {
            norm1: ln("norm1")?,
            attn1: Attention::new(vb.pp("attn1"), dim, None, heads, head_dim, upcast)?,
            norm2: ln("norm2")?,
            attn2: Attention::new(
                vb.pp("attn2"),
                dim,
                Some(cross_attention_dim),
                heads,
                head_dim,
                upcast,
            )?,
            norm3: ln("norm3")?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context))?
            + xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

/// Settings of one `Transformer2DModel` inside a UNet block.
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub heads: usize,
    /// `transformer_layers_per_block` for this block.
    pub layers: usize,
    pub cross_attention_dim: usize,
    /// `norm_num_groups` of the input GroupNorm.
    pub groups: usize,
    /// `use_linear_projection`: `proj_in`/`proj_out` are linears, else 1×1 convs.
    pub linear_projection: bool,
    pub upcast_attention: bool,
}

/// diffusers `Transformer2DModel` on continuous input: GroupNorm (eps 1e-6), `proj_in`,
/// the transformer blocks over the `h·w` tokens, `proj_out`, plus the input.
///
/// A 1×1 conv and a linear are the same per-pixel map, so both projections are held as a
/// `[out, in]` matrix (the conv weight viewed without its 1×1 dims); `proj_out` is computed
/// channel-first (`W · hᵀ`) so its output needs no transpose copy (in mixed precision
/// it is a bf16 linear followed by a transpose).
#[derive(Debug)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: ProjOut,
}

#[derive(Debug)]
enum ProjOut {
    ChannelFirst { weight: Tensor, bias: Tensor },
    Linear(Linear),
}

/// A `[out, in]` projection stored as a linear (`[out, in]`) or a 1×1 conv (`[out, in, 1, 1]`).
fn pointwise(
    vb: VarBuilder,
    in_dim: usize,
    out_dim: usize,
    linear: bool,
) -> Result<(Tensor, Tensor)> {
    let vb = parameters(&vb);
    let weight = if linear {
        vb.get((out_dim, in_dim), "weight")?
    } else {
        vb.get((out_dim, in_dim, 1, 1), "weight")?
            .squeeze(3)?
            .squeeze(2)?
    };
    Ok((weight, vb.get(out_dim, "bias")?))
}

impl Transformer2D {
    pub fn new(vb: VarBuilder, channels: usize, cfg: &TransformerConfig) -> Result<Self> {
        // `Transformer2DModel(num_attention_heads, out_channels // num_attention_heads, ...)`
        let head_dim = channels / cfg.heads;
        let inner = cfg.heads * head_dim;
        let norm = group_norm(cfg.groups, channels, 1e-6, vb.pp("norm"))?;
        let (w, b) = pointwise(vb.pp("proj_in"), channels, inner, cfg.linear_projection)?;
        let proj_in = Linear::new(w, Some(b), packs_bf16(&vb))?;
        let blocks = (0..cfg.layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i),
                    inner,
                    cfg.heads,
                    head_dim,
                    cfg.cross_attention_dim,
                    cfg.upcast_attention,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let (weight, bias) = pointwise(vb.pp("proj_out"), inner, channels, cfg.linear_projection)?;
        let proj_out = if packs_bf16(&vb) {
            ProjOut::Linear(Linear::new(weight, Some(bias), true)?)
        } else {
            ProjOut::ChannelFirst { weight, bias }
        };
        Ok(Self {
            norm,
            proj_in,
            blocks,
            proj_out,
        })
    }

    /// `xs`: `[b, c, h, w]`; `context`: the text embeddings `[b, tokens, cross_dim]`.
    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self.norm.forward_tokens(xs)?;
        let mut tokens = self.proj_in.forward(&tokens)?;
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let out = match &self.proj_out {
            // [b, c, h*w] = W[c, inner] · tokensᵀ[b, inner, h*w] + bias
            ProjOut::ChannelFirst { weight, bias } => weight
                .broadcast_left(b)?
                .matmul(&tokens.t()?)?
                .broadcast_add(&bias.reshape((c, 1))?)?,
            ProjOut::Linear(l) => l.forward(&tokens)?.t()?.contiguous()?,
        };
        out.reshape((b, c, h, w))? + xs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::max_diff;
    use candle_core::Device;

    #[test]
    fn projection_paths_match_a_plain_linear() {
        // proj_out's channel-first matmul equals the token-major linear, transposed.
        let dev = Device::Cpu;
        let tokens = Tensor::randn(0f32, 1f32, (2, 6, 4), &dev).unwrap();
        let w = Tensor::randn(0f32, 1f32, (3, 4), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1f32, 3, &dev).unwrap();
        let lin = Linear::new(w.clone(), Some(bias.clone()), false)
            .unwrap()
            .forward(&tokens)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let cf = w
            .broadcast_left(2)
            .unwrap()
            .matmul(&tokens.t().unwrap())
            .unwrap()
            .broadcast_add(&bias.reshape((3, 1)).unwrap())
            .unwrap();
        assert!(max_diff(&lin, &cf) < 1e-6);
    }
}
