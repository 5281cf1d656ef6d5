//! The model's own JSON configs, read the way diffusers and transformers read them.
//!
//! Every architecture number comes from these files (`model_index.json`,
//! `unet/config.json`, `vae/config.json`, `text_encoder/config.json`); missing keys
//! take the defaults of the Python class's `__init__` (diffusers
//! `UNet2DConditionModel`, `AutoencoderKL`; transformers `CLIPTextConfig`).
//! Features the candle modules cannot run are refused here, with the key named,
//! instead of loading a model that would compute something else.

use std::path::Path;

use candle_transformers::models::stable_diffusion::{unet_2d, vae};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Reads and parses one JSON config file, naming the file on any error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let what = if e.kind() == std::io::ErrorKind::NotFound {
            "missing (expected in an unmodified diffusers model folder)".to_string()
        } else {
            e.to_string()
        };
        Error::model_file(path, what)
    })?;
    serde_json::from_str(&text).map_err(|e| Error::model_file(path, format!("invalid config: {e}")))
}

/// A JSON value that is either one item for every block or one per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    fn get(&self, i: usize) -> Option<T> {
        match self {
            PerBlock::One(v) => Some(v.clone()),
            PerBlock::Each(v) => v.get(i).cloned(),
        }
    }
    fn len_matches(&self, n: usize) -> bool {
        match self {
            PerBlock::One(_) => true,
            PerBlock::Each(v) => v.len() == n,
        }
    }
}

/// `model_index.json`: which pipeline class and components the folder holds.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name")]
    pub class_name: String,
}

/// diffusers `UNet2DConditionModel` config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    pub sample_size: Option<PerBlock<usize>>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<usize>,
    pub transformer_layers_per_block: PerBlock<usize>,
    pub attention_head_dim: PerBlock<usize>,
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub time_embedding_type: String,
    pub time_cond_proj_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub encoder_hid_dim: Option<usize>,
}

impl Default for UNetConfig {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: s(&[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: s(&[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]),
            only_cross_attention: PerBlock::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: PerBlock::One(1),
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            time_embedding_type: "positional".into(),
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            encoder_hid_dim: None,
        }
    }
}

/// Fails with a message naming `key` unless `ok`.
fn require(path: &Path, ok: bool, key: &str, what: impl std::fmt::Display) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::model_file(
            path,
            format!("unsupported `{key}`: {what} (sdserve runs Stable Diffusion 1.x/2.x UNets)"),
        ))
    }
}

impl UNetConfig {
    /// Default image side in pixels is `sample_size * vae_scale_factor`.
    pub fn sample_size(&self) -> Option<usize> {
        self.sample_size.as_ref().and_then(|s| s.get(0))
    }

    /// Validates the config and converts it to candle's UNet config. `path` is
    /// the config file, for error messages.
    pub fn to_candle(&self, path: &Path) -> Result<unet_2d::UNet2DConditionModelConfig> {
        let n = self.block_out_channels.len();
        require(path, n > 0, "block_out_channels", "empty")?;
        require(
            path,
            self.down_block_types.len() == n,
            "down_block_types",
            "must have one entry per block_out_channels",
        )?;
        require(
            path,
            self.up_block_types.len() == n,
            "up_block_types",
            "must have one entry per block_out_channels",
        )?;
        require(
            path,
            self.mid_block_type.as_deref() == Some("UNetMidBlock2DCrossAttn"),
            "mid_block_type",
            format!("{:?}", self.mid_block_type),
        )?;
        require(path, self.act_fn == "silu", "act_fn", &self.act_fn)?;
        require(
            path,
            !self.dual_cross_attention,
            "dual_cross_attention",
            true,
        )?;
        require(
            path,
            self.class_embed_type.is_none(),
            "class_embed_type",
            format!("{:?}", self.class_embed_type),
        )?;
        require(
            path,
            self.addition_embed_type.is_none(),
            "addition_embed_type",
            format!(
                "{:?} (SDXL-style added conditioning)",
                self.addition_embed_type
            ),
        )?;
        require(
            path,
            self.encoder_hid_dim.is_none(),
            "encoder_hid_dim",
            format!("{:?}", self.encoder_hid_dim),
        )?;
        require(
            path,
            self.time_cond_proj_dim.is_none(),
            "time_cond_proj_dim",
            format!("{:?}", self.time_cond_proj_dim),
        )?;
        require(
            path,
            self.resnet_time_scale_shift == "default",
            "resnet_time_scale_shift",
            &self.resnet_time_scale_shift,
        )?;
        require(
            path,
            self.time_embedding_type == "positional",
            "time_embedding_type",
            &self.time_embedding_type,
        )?;
        require(
            path,
            self.conv_in_kernel == 3 && self.conv_out_kernel == 3,
            "conv_in_kernel/conv_out_kernel",
            "only 3 is supported",
        )?;
        require(
            path,
            matches!(self.only_cross_attention, PerBlock::One(false))
                || matches!(&self.only_cross_attention, PerBlock::Each(v) if v.iter().all(|b| !b)),
            "only_cross_attention",
            "true",
        )?;
        let layers_per_block = match self.layers_per_block {
            PerBlock::One(l) => l,
            PerBlock::Each(ref v) if !v.is_empty() && v.iter().all(|&l| l == v[0]) => v[0],
            _ => {
                return Err(Error::model_file(
                    path,
                    "unsupported `layers_per_block`: different values per block",
                ));
            }
        };
        let cross_attention_dim = match self.cross_attention_dim {
            PerBlock::One(d) => d,
            PerBlock::Each(ref v) if !v.is_empty() && v.iter().all(|&d| d == v[0]) => v[0],
            _ => {
                return Err(Error::model_file(
                    path,
                    "unsupported `cross_attention_dim`: different values per block",
                ));
            }
        };
        let norm_num_groups = self
            .norm_num_groups
            .ok_or_else(|| Error::model_file(path, "unsupported `norm_num_groups`: null"))?;
        // candle 0.11's UpBlock2D builds its resnets with the default 32 groups whatever
        // the config says; every released SD 1.x/2.x UNet uses 32.
        require(
            path,
            norm_num_groups == 32,
            "norm_num_groups",
            format!("{norm_num_groups} (candle's up blocks only run 32)"),
        )?;
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`
        // (the legacy SD configs store the head *count* under attention_head_dim).
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim);
        require(
            path,
            heads.len_matches(n),
            "attention_head_dim",
            "must have one entry per block",
        )?;
        require(
            path,
            self.transformer_layers_per_block.len_matches(n),
            "transformer_layers_per_block",
            "must have one entry per block",
        )?;
        let mut blocks = Vec::with_capacity(n);
        for (i, &out_channels) in self.block_out_channels.iter().enumerate() {
            let cross = match self.down_block_types[i].as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => {
                    return Err(Error::model_file(
                        path,
                        format!("unsupported `down_block_types[{i}]`: {other}"),
                    ));
                }
            };
            let up = &self.up_block_types[n - 1 - i];
            let up_cross = match up.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                other => {
                    return Err(Error::model_file(
                        path,
                        format!("unsupported `up_block_types[{}]`: {other}", n - 1 - i),
                    ));
                }
            };
            require(
                path,
                cross == up_cross,
                "up_block_types",
                "must mirror down_block_types",
            )?;
            let n_heads = heads.get(i).unwrap_or(1);
            require(
                path,
                n_heads > 0 && out_channels.is_multiple_of(n_heads),
                "attention_head_dim",
                format!("{n_heads} heads do not divide {out_channels} channels"),
            )?;
            require(
                path,
                out_channels.is_multiple_of(norm_num_groups),
                "norm_num_groups",
                format!("{norm_num_groups} groups do not divide {out_channels} channels"),
            )?;
            let layers = self.transformer_layers_per_block.get(i).unwrap_or(1);
            blocks.push(unet_2d::BlockConfig {
                out_channels,
                use_cross_attn: cross.then_some(layers),
                attention_head_dim: n_heads,
            });
        }
        Ok(unet_2d::UNet2DConditionModelConfig {
            center_input_sample: self.center_input_sample,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            blocks,
            layers_per_block,
            downsample_padding: self.downsample_padding,
            mid_block_scale_factor: self.mid_block_scale_factor,
            norm_num_groups,
            norm_eps: self.norm_eps,
            cross_attention_dim,
            // candle 0.11's sliced attention stacks where it should concatenate.
            sliced_attention_size: None,
            use_linear_projection: self.use_linear_projection,
        })
    }
}

/// diffusers `AutoencoderKL` config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: usize,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl VaeConfig {
    /// Pixels per latent cell: `2 ** (len(block_out_channels) - 1)`, as in
    /// diffusers' `StableDiffusionPipeline.__init__`.
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    pub fn to_candle(&self, path: &Path) -> Result<vae::AutoEncoderKLConfig> {
        let n = self.block_out_channels.len();
        require(path, n > 0, "block_out_channels", "empty")?;
        require(path, self.act_fn == "silu", "act_fn", &self.act_fn)?;
        require(
            path,
            self.mid_block_add_attention,
            "mid_block_add_attention",
            false,
        )?;
        require(
            path,
            self.in_channels == 3 && self.out_channels == 3,
            "in_channels/out_channels",
            "only RGB (3) is supported",
        )?;
        require(
            path,
            self.down_block_types
                .iter()
                .all(|t| t == "DownEncoderBlock2D")
                && self.down_block_types.len() == n,
            "down_block_types",
            "expected DownEncoderBlock2D per block",
        )?;
        require(
            path,
            self.up_block_types.iter().all(|t| t == "UpDecoderBlock2D")
                && self.up_block_types.len() == n,
            "up_block_types",
            "expected UpDecoderBlock2D per block",
        )?;
        for &c in &self.block_out_channels {
            require(
                path,
                c.is_multiple_of(self.norm_num_groups),
                "norm_num_groups",
                format!("{} groups do not divide {c} channels", self.norm_num_groups),
            )?;
        }
        Ok(vae::AutoEncoderKLConfig {
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            latent_channels: self.latent_channels,
            norm_num_groups: self.norm_num_groups,
            use_quant_conv: self.use_quant_conv,
            use_post_quant_conv: self.use_post_quant_conv,
        })
    }
}

/// transformers `CLIPTextConfig` (the `text_encoder/config.json` of SD 1.x/2.x).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipTextConfig {
    pub fn validate(&self, path: &Path) -> Result<()> {
        require(
            path,
            self.num_attention_heads > 0
                && self.hidden_size.is_multiple_of(self.num_attention_heads),
            "num_attention_heads",
            "must divide hidden_size",
        )?;
        require(
            path,
            crate::diffusion::clip::Activation::parse(&self.hidden_act).is_some(),
            "hidden_act",
            &self.hidden_act,
        )?;
        Ok(())
    }
}
