//! The Stable Diffusion 1.x/2.x denoiser: diffusers 0.42.1 `UNet2DConditionModel`
//! (`models/unets/unet_2d_condition.py`) with the blocks of `models/unets/unet_2d_blocks.py`
//! (`CrossAttnDownBlock2D`, `DownBlock2D`, `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`,
//! `UpBlock2D`) and the timestep embedding of `models/embeddings.py`
//! (`get_timestep_embedding`, `TimestepEmbedding`).
//!
//! The U-Net of Ronneberger et al. 2015 with the text cross-attention of Rombach et al.
//! 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models"). Every
//! architecture number comes from `unet/config.json` ([`UNetConfig`]); configurations this
//! module cannot run are refused with the offending key named. The layers themselves are
//! in [`crate::diffusion::layers`].

use std::path::Path;

use crate::diffusion::layers::activation_dtype;
use crate::diffusion::layers::conv::{Conv2d, conv2d};
use crate::diffusion::layers::linear::{Linear, linear, linear_no_bias};
use crate::diffusion::layers::norm::{GroupNorm, group_norm};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::diffusion::layers::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::diffusion::layers::transformer::Transformer2D;
use crate::diffusion::loading::config::UNetConfig;
mod added;
mod plan;
use added::AddEmbedding;
pub use added::AddedConditioning;
use plan::Plan;

/// `CrossAttnDownBlock2D` (with `attentions`) or `DownBlock2D` (without).
#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// Runs the block, pushing each output diffusers puts in `output_states`.
    fn forward(
        &self,
        xs: &Tensor,
        temb_act: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, Some(temb_act))?;
            if let Some(attn) = self.attentions.get(j) {
                xs = attn.forward(&xs, context)?;
            }
            skips.push(xs.clone());
        }
        if let Some(down) = &self.downsampler {
            xs = down.forward(&xs)?;
            skips.push(xs.clone());
        }
        Ok(xs)
    }
}

/// `UNetMidBlock2DCrossAttn` with one layer: resnet, transformer, resnet.
#[derive(Debug)]
struct MidBlock {
    resnet_in: ResnetBlock2D,
    attention: Transformer2D,
    resnet_out: ResnetBlock2D,
}

/// `CrossAttnUpBlock2D` (with `attentions`) or `UpBlock2D` (without).
#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// `skips`: this block's share of the down path's outputs, last-pushed last.
    fn forward(
        &self,
        xs: &Tensor,
        mut skips: Vec<Tensor>,
        temb_act: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                candle_core::Error::Msg("UNet: skip connections exhausted".into())
            })?;
            xs = resnet.forward(&Tensor::cat(&[&xs, &skip], 1)?, Some(temb_act))?;
            if let Some(attn) = self.attentions.get(j) {
                xs = attn.forward(&xs, context)?;
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&xs, upsample_size),
            None => Ok(xs),
        }
    }
}

/// What a UNet call takes beyond the sample, timestep and text states.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extra<'a> {
    /// SDXL's `added_cond_kwargs` (pooled text embedding and time ids).
    pub added: Option<&'a AddedConditioning>,
    /// `timestep_cond` `[rows, time_cond_proj_dim]`: an LCM UNet's guidance
    /// scale embedding.
    pub timestep_cond: Option<&'a Tensor>,
}

/// diffusers `UNet2DConditionModel` for Stable Diffusion 1.x/2.x.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    /// `time_embedding.cond_proj` of a UNet with `time_cond_proj_dim` (an
    /// LCM-distilled one: the guidance scale comes in as an embedding).
    time_cond_proj: Option<Linear>,
    time_cond_dim: Option<usize>,
    /// SDXL's `add_embedding` (with `add_time_proj`), when the config has one.
    add_embedding: Option<AddEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// `block_out_channels[0]`: width of the sinusoidal timestep embedding.
    time_proj_dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    center_input_sample: bool,
    dtype: DType,
}

impl UNet2DConditionModel {
    /// Builds the UNet described by `cfg` (read from `cfg_path`, named in config errors)
    /// from `vb`, requesting exactly diffusers' `state_dict` tensors. Tensor errors come
    /// back as [`Error::Candle`] for the caller to attribute to the weight file.
    pub fn new(vb: VarBuilder, cfg: &UNetConfig, cfg_path: &Path) -> crate::Result<Self> {
        let plan = Plan::new(cfg, cfg_path)?;
        let n = plan.channels.len();
        let c0 = plan.channels[0];
        let temb_dim = 4 * c0; // `_set_time_proj`, positional: block_out_channels[0] * 4
        let resnet = |output_scale_factor| ResnetConfig {
            groups: plan.groups,
            eps: cfg.norm_eps,
            temb_channels: Some(temb_dim),
            output_scale_factor,
        };
        let pad = |k: usize| Conv2dConfig {
            padding: (k - 1) / 2,
            ..Default::default()
        };
        let conv_in = conv2d(
            cfg.in_channels,
            c0,
            cfg.conv_in_kernel,
            pad(cfg.conv_in_kernel),
            vb.pp("conv_in"),
        )?;
        let time_linear_1 = linear(c0, temb_dim, vb.pp("time_embedding.linear_1"))?;
        let time_linear_2 = linear(temb_dim, temb_dim, vb.pp("time_embedding.linear_2"))?;
        let time_cond_proj = cfg
            .time_cond_proj_dim
            .map(|d| linear_no_bias(d, c0, vb.pp("time_embedding.cond_proj")))
            .transpose()?;
        let add_embedding = plan
            .added
            .map(|p| {
                AddEmbedding::new(
                    vb.pp("add_embedding"),
                    p,
                    temb_dim,
                    cfg.flip_sin_to_cos,
                    cfg.freq_shift,
                )
            })
            .transpose()?;

        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let vb = vb.pp("down_blocks").pp(i);
            let in_c = if i == 0 { c0 } else { plan.channels[i - 1] };
            let out_c = plan.channels[i];
            let mut resnets = Vec::with_capacity(plan.layers[i]);
            let mut attentions = Vec::new();
            for j in 0..plan.layers[i] {
                let c = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock2D::new(
                    vb.pp("resnets").pp(j),
                    c,
                    out_c,
                    &resnet(1.0),
                )?);
                if plan.down_attn[i] {
                    let t = plan.transformer(cfg, i);
                    attentions.push(Transformer2D::new(vb.pp("attentions").pp(j), out_c, &t)?);
                }
            }
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(
                    vb.pp("downsamplers.0"),
                    out_c,
                    cfg.downsample_padding,
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let mid = vb.pp("mid_block");
        let c_last = plan.channels[n - 1];
        let mid_resnet = resnet(cfg.mid_block_scale_factor);
        let mid_block = MidBlock {
            resnet_in: ResnetBlock2D::new(mid.pp("resnets.0"), c_last, c_last, &mid_resnet)?,
            attention: Transformer2D::new(
                mid.pp("attentions.0"),
                c_last,
                &plan.transformer(cfg, n - 1),
            )?,
            resnet_out: ResnetBlock2D::new(mid.pp("resnets.1"), c_last, c_last, &mid_resnet)?,
        };

        // Up block i mirrors down block n-1-i (`reversed_*` in diffusers).
        let mut up_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let vb = vb.pp("up_blocks").pp(i);
            let d = n - 1 - i;
            let out_c = plan.channels[d];
            let prev_c = plan.channels[(d + 1).min(n - 1)];
            let in_c = plan.channels[d.saturating_sub(1)];
            let num_layers = plan.layers[d] + 1;
            let mut resnets = Vec::with_capacity(num_layers);
            let mut attentions = Vec::new();
            for j in 0..num_layers {
                let skip_c = if j + 1 == num_layers { in_c } else { out_c };
                let res_c = if j == 0 { prev_c } else { out_c };
                resnets.push(ResnetBlock2D::new(
                    vb.pp("resnets").pp(j),
                    res_c + skip_c,
                    out_c,
                    &resnet(1.0),
                )?);
                if plan.up_attn[i] {
                    let t = plan.transformer(cfg, d);
                    attentions.push(Transformer2D::new(vb.pp("attentions").pp(j), out_c, &t)?);
                }
            }
            let upsampler = if i + 1 < n {
                Some(Upsample2D::new(vb.pp("upsamplers.0"), out_c)?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        let conv_norm_out = group_norm(plan.groups, c0, cfg.norm_eps, vb.pp("conv_norm_out"))?;
        let conv_out = conv2d(
            c0,
            cfg.out_channels,
            cfg.conv_out_kernel,
            pad(cfg.conv_out_kernel),
            vb.pp("conv_out"),
        )?;
        Ok(Self {
            conv_in,
            time_linear_1,
            time_linear_2,
            time_cond_proj,
            time_cond_dim: cfg.time_cond_proj_dim,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            time_proj_dim: c0,
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            freq_shift: cfg.freq_shift,
            center_input_sample: cfg.center_input_sample,
            dtype: activation_dtype(&vb),
        })
    }

    /// The compute dtype (that of the weights).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether the model needs [`AddedConditioning`] (SDXL's `text_time`).
    pub fn takes_added_conditioning(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// The width of the `timestep_cond` this UNet takes (`time_cond_proj_dim`), if any.
    pub fn time_cond_dim(&self) -> Option<usize> {
        self.time_cond_dim
    }

    /// [`Self::forward_with`] for UNets without added conditioning.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        self.forward_with(sample, timestep, encoder_hidden_states, Extra::default())
    }

    /// The noise (or v) prediction for `sample` `[b, in_channels, h, w]` at `timestep`,
    /// conditioned on `encoder_hidden_states` `[b, tokens, cross_attention_dim]` and
    /// what [`Extra`] holds (`UNet2DConditionModel.forward`). Inputs are cast to
    /// the compute dtype; the output is in it.
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        extra: Extra<'_>,
    ) -> Result<Tensor> {
        let Extra {
            added,
            timestep_cond,
        } = extra;
        let sample = sample.to_dtype(self.dtype)?;
        let context = encoder_hidden_states.to_dtype(self.dtype)?;
        let (_, _, h, w) = sample.dims4()?;
        // Upsamplers are told the skip's size when the sides are not multiples of
        // 2^num_upsamplers (`forward_upsample_size`).
        let overall_up_factor = 1usize << (self.up_blocks.len() - 1);
        let forward_upsample_size =
            !h.is_multiple_of(overall_up_factor) || !w.is_multiple_of(overall_up_factor);

        // 0. center input
        let sample = if self.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample
        };
        // 1. time: one embedding broadcast over the batch; every resnet applies
        // `nonlinearity(temb)` first, so SiLU is applied here once.
        let t_emb = timestep_embedding(
            timestep,
            self.time_proj_dim,
            self.flip_sin_to_cos,
            self.freq_shift,
            sample.device(),
        )?
        .to_dtype(self.dtype)?;
        // `TimestepEmbedding.forward`: `sample + cond_proj(condition)` first.
        let t_emb = match (&self.time_cond_proj, timestep_cond) {
            (None, None) => t_emb,
            (Some(proj), Some(cond)) => {
                t_emb.broadcast_add(&proj.forward(&cond.to_dtype(self.dtype)?)?)?
            }
            (Some(_), None) => {
                candle_core::bail!("this UNet needs timestep_cond (time_cond_proj_dim)")
            }
            (None, Some(_)) => {
                candle_core::bail!("this UNet takes no timestep_cond (no time_cond_proj_dim)")
            }
        };
        let temb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&t_emb)?.silu()?)?;
        // `emb = emb + aug_emb`: one row per sample once SDXL's ids are in.
        let temb = match (&self.add_embedding, added) {
            (None, None) => temb,
            (Some(add), Some(added)) => temb.broadcast_add(&add.forward(added, self.dtype)?)?,
            (Some(_), None) => {
                candle_core::bail!("this UNet needs text_embeds and time_ids (addition_embed_type)")
            }
            (None, Some(_)) => {
                candle_core::bail!("this UNet takes no added conditioning (no addition_embed_type)")
            }
        };
        let temb_act = temb.silu()?;
        // 2. pre-process
        let mut xs = self.conv_in.forward(&sample)?;
        // 3. down
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            xs = block.forward(&xs, &temb_act, &context, &mut skips)?;
        }
        // 4. mid
        let mid = &self.mid_block;
        xs = mid.resnet_in.forward(&xs, Some(&temb_act))?;
        xs = mid.attention.forward(&xs, &context)?;
        xs = mid.resnet_out.forward(&xs, Some(&temb_act))?;
        // 5. up
        for (i, block) in self.up_blocks.iter().enumerate() {
            let take = block.resnets.len();
            if skips.len() < take {
                candle_core::bail!("UNet: up block {i} needs {take} skip connections");
            }
            let own = skips.split_off(skips.len() - take);
            let upsample_size = match skips.last() {
                Some(next) if forward_upsample_size && i + 1 < self.up_blocks.len() => {
                    let (_, _, h, w) = next.dims4()?;
                    Some((h, w))
                }
                _ => None,
            };
            xs = block.forward(&xs, own, &temb_act, &context, upsample_size)?;
        }
        // 6. post-process
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

/// diffusers `get_timestep_embedding(timesteps, dim, flip_sin_to_cos, downscale_freq_shift)`
/// for one timestep, `[1, dim]` f32.
fn timestep_embedding(
    timestep: f64,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    timestep_embeddings(&[timestep], dim, flip_sin_to_cos, freq_shift, device)
}

/// `get_timestep_embedding` for each of `timesteps`, `[len, dim]` f32, computed in
/// f32 step by step as diffusers does (`exp(-ln(10000) · i / (half - shift))`,
/// times `t`, then sin/cos).
fn timestep_embeddings(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let log_period = -(10000f64.ln()) as f32;
    let denom = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (log_period * i as f32 / denom).exp())
        .collect();
    let mut out = Vec::with_capacity(timesteps.len() * dim);
    for &timestep in timesteps {
        let t = timestep as f32;
        let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
        let sin = args.iter().map(|a| a.sin());
        let cos = args.iter().map(|a| a.cos());
        let start = out.len();
        if flip_sin_to_cos {
            out.extend(cos.chain(sin));
        } else {
            out.extend(sin.chain(cos));
        }
        out.resize(start + dim, 0.0); // odd `dim`: one zero of padding
    }
    Tensor::from_vec(out, (timesteps.len(), dim), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::loading::config::PerBlock;

    fn plan_err(edit: impl FnOnce(&mut UNetConfig)) -> String {
        let mut cfg = UNetConfig::default();
        edit(&mut cfg);
        Plan::new(&cfg, Path::new("unet/config.json"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn plan_resolves_per_block_values() {
        // diffusers' defaults (the SD 1.x layout) with per-block lists.
        let cfg = UNetConfig {
            attention_head_dim: PerBlock::Each(vec![5, 10, 20, 20]),
            layers_per_block: PerBlock::Each(vec![1, 2, 3, 2]),
            norm_num_groups: Some(16),
            ..Default::default()
        };
        let plan = Plan::new(&cfg, Path::new("c")).unwrap();
        assert_eq!(plan.heads, [5, 10, 20, 20]);
        assert_eq!(plan.layers, [1, 2, 3, 2]);
        assert_eq!(plan.transformer_layers, [1, 1, 1, 1]);
        assert_eq!(plan.down_attn, [true, true, true, false]);
        assert_eq!(plan.up_attn, [false, true, true, true]);
        assert_eq!(plan.groups, 16);
    }

    #[test]
    fn plan_refuses_with_the_key_named() {
        let e = plan_err(|c| c.up_block_types[1] = "AttnUpBlock2D".into());
        assert!(
            e.contains("unet/config.json") && e.contains("`up_block_types[1]`"),
            "{e}"
        );
        let e = plan_err(|c| c.attention_head_dim = PerBlock::One(7));
        assert!(
            e.contains("`attention_head_dim`") && e.contains("7 heads"),
            "{e}"
        );
        let e = plan_err(|c| c.num_attention_heads = Some(PerBlock::Each(vec![8, 8])));
        assert!(e.contains("`num_attention_heads`"), "{e}");
        let e = plan_err(|c| c.transformer_layers_per_block = PerBlock::Each(vec![1]));
        assert!(e.contains("`transformer_layers_per_block`"), "{e}");
        let e = plan_err(|c| c.norm_num_groups = None);
        assert!(e.contains("`norm_num_groups`"), "{e}");
        let e = plan_err(|c| c.norm_num_groups = Some(48));
        assert!(e.contains("`norm_num_groups`") && e.contains("320"), "{e}");
        let e = plan_err(|c| c.conv_in_kernel = 4);
        assert!(e.contains("`conv_in_kernel`"), "{e}");
        let e =
            plan_err(|c| c.only_cross_attention = PerBlock::Each(vec![false, true, false, false]));
        assert!(e.contains("`only_cross_attention`"), "{e}");
        let e = plan_err(|c| c.act_fn = "gelu".into());
        assert!(e.contains("`act_fn`"), "{e}");
    }

    #[test]
    fn timestep_embedding_layout() {
        let e = timestep_embedding(10.0, 6, true, 0.0, &Device::Cpu).unwrap();
        let v: Vec<f32> = e.flatten_all().unwrap().to_vec1().unwrap();
        // freqs exp(-ln(1e4) * i / 3): 1, 10^(-4/3), 10^(-8/3); cos first when flipped.
        let f = [1f64, 10f64.powf(-4.0 / 3.0), 10f64.powf(-8.0 / 3.0)];
        for i in 0..3 {
            assert!((v[i] as f64 - (10.0 * f[i]).cos()).abs() < 1e-5);
            assert!((v[3 + i] as f64 - (10.0 * f[i]).sin()).abs() < 1e-5);
        }
        let odd = timestep_embedding(10.0, 7, false, 1.0, &Device::Cpu).unwrap();
        let v: Vec<f32> = odd.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v.len(), 7);
        assert_eq!(v[6], 0.0);
        // shift 1: freqs exp(-ln(1e4) * i / 2); sin first when not flipped.
        assert!((v[0] - 10f32.sin()).abs() < 1e-6);
        assert!((v[3] - 10f32.cos()).abs() < 1e-6);
    }
}
