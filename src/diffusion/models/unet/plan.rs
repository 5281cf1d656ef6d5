//! The UNet config resolved and checked once: one value per block, every
//! configuration this model cannot run refused with the offending key named.

use std::path::Path;

use crate::diffusion::layers::transformer::TransformerConfig;
use crate::diffusion::loading::config::{PerBlock, UNetConfig, require, require_groups_divide};
use crate::error::Error;

/// The config resolved to one value per down block (index `i` of `block_out_channels`),
/// after validation.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub(super) channels: Vec<usize>,
    pub(super) down_attn: Vec<bool>,
    /// In `up_block_types` order (deepest first).
    pub(super) up_attn: Vec<bool>,
    pub(super) layers: Vec<usize>,
    pub(super) heads: Vec<usize>,
    pub(super) transformer_layers: Vec<usize>,
    pub(super) cross_attention_dim: Vec<usize>,
    pub(super) groups: usize,
    /// SDXL's `addition_embed_type: "text_time"`.
    pub(super) added: Option<TextTimePlan>,
}

/// `addition_embed_type: "text_time"`: each time id through a sinusoidal
/// embedding of `time_embed_dim`, concatenated after the pooled text embedding,
/// `input_dim` wide in all (`projection_class_embeddings_input_dim`).
#[derive(Debug, Clone, Copy)]
pub(super) struct TextTimePlan {
    pub(super) time_embed_dim: usize,
    pub(super) input_dim: usize,
}

/// The added conditioning `cfg` asks for: none, or SDXL's text_time (with its two
/// widths, which must then be set); other kinds are refused.
fn added_conditioning(cfg: &UNetConfig, path: &Path) -> crate::Result<Option<TextTimePlan>> {
    match cfg.addition_embed_type.as_deref() {
        // diffusers builds no added embedding then, whatever the widths say.
        None => Ok(None),
        Some("text_time") => {
            let need = |key: &str, v: Option<usize>| {
                v.filter(|&d| d > 0).ok_or_else(|| {
                    Error::model_file(
                        path,
                        format!("`{key}` must be set for addition_embed_type \"text_time\""),
                    )
                })
            };
            let time_embed_dim = need("addition_time_embed_dim", cfg.addition_time_embed_dim)?;
            let input_dim = need(
                "projection_class_embeddings_input_dim",
                cfg.projection_class_embeddings_input_dim,
            )?;
            Ok(Some(TextTimePlan {
                time_embed_dim,
                input_dim,
            }))
        }
        Some(other) => Err(Error::model_file(
            path,
            format!("unsupported `addition_embed_type`: {other:?} (supported: \"text_time\")"),
        )),
    }
}

/// `value` for every block, or the per-block list; `key` names it in errors.
fn per_block<T: Clone>(path: &Path, v: &PerBlock<T>, n: usize, key: &str) -> crate::Result<Vec<T>> {
    require(path, v.len_matches(n), key, "must have one entry per block")?;
    Ok((0..n).map(|i| v.get(i).expect("length checked")).collect())
}

fn block_has_attention(
    path: &Path,
    key: &str,
    i: usize,
    ty: &str,
    kinds: [&str; 2],
) -> crate::Result<bool> {
    if ty == kinds[0] {
        Ok(true)
    } else if ty == kinds[1] {
        Ok(false)
    } else {
        Err(Error::model_file(
            path,
            format!(
                "unsupported `{key}[{i}]`: {ty} (supported: {}, {})",
                kinds[0], kinds[1]
            ),
        ))
    }
}

impl Plan {
    /// Validates `cfg` (read from `path`) against what this module runs, the way
    /// diffusers' `UNet2DConditionModel.__init__` / `_check_config` would build it.
    pub(super) fn new(cfg: &UNetConfig, path: &Path) -> crate::Result<Self> {
        let n = cfg.block_out_channels.len();
        require(path, n > 0, "block_out_channels", "empty")?;
        let one_per_block = "must have one entry per block_out_channels";
        require(
            path,
            cfg.down_block_types.len() == n,
            "down_block_types",
            one_per_block,
        )?;
        require(
            path,
            cfg.up_block_types.len() == n,
            "up_block_types",
            one_per_block,
        )?;
        require(
            path,
            cfg.mid_block_type.as_deref() == Some("UNetMidBlock2DCrossAttn"),
            "mid_block_type",
            format!("{:?}", cfg.mid_block_type),
        )?;
        // diffusers' get_activation maps both names to nn.SiLU.
        require(
            path,
            cfg.act_fn == "silu" || cfg.act_fn == "swish",
            "act_fn",
            &cfg.act_fn,
        )?;
        require(
            path,
            !cfg.dual_cross_attention,
            "dual_cross_attention",
            true,
        )?;
        require(
            path,
            cfg.class_embed_type.is_none(),
            "class_embed_type",
            format!("{:?}", cfg.class_embed_type),
        )?;
        let added = added_conditioning(cfg, path)?;
        require(
            path,
            cfg.encoder_hid_dim.is_none(),
            "encoder_hid_dim",
            format!("{:?}", cfg.encoder_hid_dim),
        )?;
        require(
            path,
            // The guidance embedding divides by dim / 2 - 1 (NaN below 4).
            cfg.time_cond_proj_dim.is_none_or(|d| d >= 4),
            "time_cond_proj_dim",
            format!("{:?} (at least 4)", cfg.time_cond_proj_dim),
        )?;
        require(
            path,
            cfg.resnet_time_scale_shift == "default",
            "resnet_time_scale_shift",
            &cfg.resnet_time_scale_shift,
        )?;
        require(
            path,
            cfg.time_embedding_type == "positional",
            "time_embedding_type",
            &cfg.time_embedding_type,
        )?;
        // Keys of UNet2DConditionModel.__init__ that change the network when set
        // away from their defaults (SD 1.x/2.x leave them all at the default).
        let unset =
            |key: &str, is_default: bool, value: String| require(path, is_default, key, value);
        unset(
            "attention_type",
            cfg.attention_type == "default",
            cfg.attention_type.clone(),
        )?;
        unset(
            "time_embedding_act_fn",
            cfg.time_embedding_act_fn.is_none(),
            format!("{:?}", cfg.time_embedding_act_fn),
        )?;
        unset(
            "timestep_post_act",
            cfg.timestep_post_act.is_none(),
            format!("{:?}", cfg.timestep_post_act),
        )?;
        unset(
            "num_class_embeds",
            cfg.num_class_embeds.is_none(),
            format!("{:?}", cfg.num_class_embeds),
        )?;
        unset(
            "class_embeddings_concat",
            !cfg.class_embeddings_concat,
            "true".into(),
        )?;
        unset(
            "reverse_transformer_layers_per_block",
            cfg.reverse_transformer_layers_per_block
                .as_ref()
                .is_none_or(serde_json::Value::is_null),
            format!("{:?}", cfg.reverse_transformer_layers_per_block),
        )?;
        unset(
            "mid_block_only_cross_attention",
            cfg.mid_block_only_cross_attention != Some(true),
            "true".into(),
        )?;
        unset(
            "cross_attention_norm",
            cfg.cross_attention_norm.is_none(),
            format!("{:?}", cfg.cross_attention_norm),
        )?;
        unset(
            "time_embedding_dim",
            cfg.time_embedding_dim
                .is_none_or(|d| d == cfg.block_out_channels[0] * 4),
            format!("{:?}", cfg.time_embedding_dim),
        )?;
        // diffusers pads by (k - 1) // 2; an even kernel would change the spatial size.
        for (key, k) in [
            ("conv_in_kernel", cfg.conv_in_kernel),
            ("conv_out_kernel", cfg.conv_out_kernel),
        ] {
            require(path, k % 2 == 1, key, format!("{k} (must be odd)"))?;
        }
        let only_cross = per_block(path, &cfg.only_cross_attention, n, "only_cross_attention")?;
        require(
            path,
            only_cross.iter().all(|&b| !b),
            "only_cross_attention",
            "true",
        )?;
        let groups = cfg
            .norm_num_groups
            .ok_or_else(|| Error::model_file(path, "unsupported `norm_num_groups`: null"))?;
        require_groups_divide(path, groups, &cfg.block_out_channels)?;
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`
        // (the legacy SD configs store the head *count* under attention_head_dim).
        let (heads_key, heads) = match &cfg.num_attention_heads {
            Some(h) => ("num_attention_heads", h),
            None => ("attention_head_dim", &cfg.attention_head_dim),
        };
        let heads = per_block(path, heads, n, heads_key)?;
        let layers = per_block(path, &cfg.layers_per_block, n, "layers_per_block")?;
        let transformer_layers = per_block(
            path,
            &cfg.transformer_layers_per_block,
            n,
            "transformer_layers_per_block",
        )?;
        let cross_attention_dim =
            per_block(path, &cfg.cross_attention_dim, n, "cross_attention_dim")?;
        let down_attn = (0..n)
            .map(|i| {
                block_has_attention(
                    path,
                    "down_block_types",
                    i,
                    &cfg.down_block_types[i],
                    ["CrossAttnDownBlock2D", "DownBlock2D"],
                )
            })
            .collect::<crate::Result<Vec<_>>>()?;
        let up_attn = (0..n)
            .map(|i| {
                block_has_attention(
                    path,
                    "up_block_types",
                    i,
                    &cfg.up_block_types[i],
                    ["CrossAttnUpBlock2D", "UpBlock2D"],
                )
            })
            .collect::<crate::Result<Vec<_>>>()?;
        let plan = Self {
            channels: cfg.block_out_channels.clone(),
            down_attn,
            up_attn,
            layers,
            heads,
            transformer_layers,
            cross_attention_dim,
            groups,
            added,
        };
        // Every Transformer2DModel splits its channels evenly between its heads: the down
        // block i, the mid block (last entry) and up block j (entry n-1-j) that attend.
        let attending = (0..n)
            .filter(|&i| plan.down_attn[i] || plan.up_attn[n - 1 - i])
            .chain([n - 1]);
        for i in attending {
            let (h, c) = (plan.heads[i], plan.channels[i]);
            require(
                path,
                h > 0 && c.is_multiple_of(h),
                heads_key,
                format!("{h} heads do not divide {c} channels"),
            )?;
        }
        Ok(plan)
    }

    pub(super) fn transformer(&self, cfg: &UNetConfig, i: usize) -> TransformerConfig {
        TransformerConfig {
            heads: self.heads[i],
            layers: self.transformer_layers[i],
            cross_attention_dim: self.cross_attention_dim[i],
            groups: self.groups,
            linear_projection: cfg.use_linear_projection,
            upcast_attention: cfg.upcast_attention,
        }
    }
}
