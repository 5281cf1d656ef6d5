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

/// The shape of one diffusers `Attention`.
#[derive(Debug, Clone, Copy)]
pub struct AttentionConfig {
    pub query_dim: usize,
    /// `cross_attention_dim`: `None` is self-attention.
    pub context_dim: Option<usize>,
    pub heads: usize,
    pub head_dim: usize,
    /// diffusers' `upcast_attention`: in f16/bf16, `q kᵀ` is computed in f32 (as
    /// diffusers' `Attention.get_attention_scores` does). The softmax is always f32.
    pub upcast: bool,
    /// `bias`: q/k/v carry biases (the VAE's attention); `to_out.0` always does.
    pub qkv_bias: bool,
}

/// diffusers `Attention` run the way `AttnProcessor2_0` runs it:
/// `softmax(q kᵀ / √d) v` per head, then `to_out`.
#[derive(Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    upcast: bool,
    /// Mixed precision: the attention kernel takes bf16 products too.
    mixed: bool,
}

impl Attention {
    pub fn new(vb: VarBuilder, cfg: &AttentionConfig) -> Result<Self> {
        let inner = cfg.heads * cfg.head_dim;
        let context_dim = cfg.context_dim.unwrap_or(cfg.query_dim);
        let qkv = |dim: usize, name: &str| {
            if cfg.qkv_bias {
                linear(dim, inner, vb.pp(name))
            } else {
                linear_no_bias(dim, inner, vb.pp(name))
            }
        };
        Ok(Self {
            to_q: qkv(cfg.query_dim, "to_q")?,
            to_k: qkv(context_dim, "to_k")?,
            to_v: qkv(context_dim, "to_v")?,
            to_out: linear(inner, cfg.query_dim, vb.pp("to_out.0"))?,
            heads: cfg.heads,
            head_dim: cfg.head_dim,
            upcast: cfg.upcast,
            mixed: packs_bf16(&vb),
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
            self.mixed,
        )?;
        self.to_out.forward(&out)
    }
}

/// diffusers `Attention` over the pixels of a feature map, with its own `group_norm` and
/// `residual_connection=True`: the VAE's mid-block attention (one head as wide as the
/// channels, q/k/v with biases). `[b, c, h, w]` in and out.
#[derive(Debug)]
pub struct SpatialSelfAttention {
    norm: GroupNorm,
    attention: Attention,
}

impl SpatialSelfAttention {
    pub fn new(vb: VarBuilder, channels: usize, groups: usize, eps: f64) -> Result<Self> {
        let cfg = AttentionConfig {
            query_dim: channels,
            context_dim: None,
            heads: 1,
            head_dim: channels,
            upcast: false,
            qkv_bias: true,
        };
        Ok(Self {
            norm: group_norm(groups, channels, eps, vb.pp("group_norm"))?,
            attention: Attention::new(vb, &cfg)?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let out = self
            .attention
            .forward(&self.norm.forward_tokens(xs)?, None)?;
        xs + out.transpose(1, 2)?.reshape((b, c, h, w))?
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
        let attn = |context_dim| AttentionConfig {
            query_dim: dim,
            context_dim,
            heads,
            head_dim,
            upcast,
            qkv_bias: false,
        };
        Ok(Self {
            norm1: ln("norm1")?,
            attn1: Attention::new(vb.pp("attn1"), &attn(None))?,
            norm2: ln("norm2")?,
            attn2: Attention::new(vb.pp("attn2"), &attn(Some(cross_attention_dim)))?,
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
/// A 1×1 conv and a linear are the same per-pixel map, so both projections are held as
/// linears (the conv weight viewed without its 1×1 dims); `proj_out` goes straight back
/// to channel-first ([`Linear::forward_channel_first`]).
#[derive(Debug)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

/// A `[out, in]` projection stored as a linear (`[out, in]`) or a 1×1 conv (`[out, in, 1, 1]`).
fn pointwise(vb: VarBuilder, in_dim: usize, out_dim: usize, is_linear: bool) -> Result<Linear> {
    if is_linear {
        return linear(in_dim, out_dim, vb);
    }
    let p = parameters(&vb);
    let weight = p
        .get((out_dim, in_dim, 1, 1), "weight")?
        .squeeze(3)?
        .squeeze(2)?;
    Linear::new(weight, Some(p.get(out_dim, "bias")?), packs_bf16(&vb))
}

impl Transformer2D {
    pub fn new(vb: VarBuilder, channels: usize, cfg: &TransformerConfig) -> Result<Self> {
        // `Transformer2DModel(num_attention_heads, out_channels // num_attention_heads, ...)`
        let head_dim = channels / cfg.heads;
        let inner = cfg.heads * head_dim;
        let norm = group_norm(cfg.groups, channels, 1e-6, vb.pp("norm"))?;
        let proj_in = pointwise(vb.pp("proj_in"), channels, inner, cfg.linear_projection)?;
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
        let proj_out = pointwise(vb.pp("proj_out"), inner, channels, cfg.linear_projection)?;
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
        let out = self.proj_out.forward_channel_first(&tokens)?;
        out.reshape((b, c, h, w))? + xs
    }
}
