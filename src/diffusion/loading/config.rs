//! The model's own JSON configs, read the way diffusers and transformers read them.
//!
//! Every architecture number comes from these files (`model_index.json`,
//! `unet/config.json`, `vae/config.json`, `text_encoder/config.json`); missing keys
//! take the defaults of the Python class's `__init__` (diffusers
//! `UNet2DConditionModel`, `AutoencoderKL`; transformers `CLIPTextConfig`).
//! Features the modules cannot run are refused, with the key named, instead of
//! loading a model that would compute something else (the UNet's checks live with the
//! UNet, in [`crate::diffusion::models::unet`]).

use std::path::Path;

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
    pub(crate) fn get(&self, i: usize) -> Option<T> {
        match self {
            PerBlock::One(v) => Some(v.clone()),
            PerBlock::Each(v) => v.get(i).cloned(),
        }
    }
    pub(crate) fn len_matches(&self, n: usize) -> bool {
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
    /// SDXL pipelines' config (diffusers' default: true): with no negative
    /// prompt, the unconditional embeddings are zeros.
    #[serde(default = "yes")]
    pub force_zeros_for_empty_prompt: bool,
    /// The SDXL refiner's img2img config: its time ids end in an aesthetic
    /// score instead of the target size.
    #[serde(default)]
    pub requires_aesthetics_score: bool,
    /// Every component entry (`"unet": ["diffusers", "UNet2DConditionModel"]`).
    #[serde(flatten)]
    pub components: serde_json::Map<String, serde_json::Value>,
}

fn yes() -> bool {
    true
}

impl ModelIndex {
    /// Whether the index says component `name` is absent: diffusers writes
    /// `[null, null]` for one, as for the SDXL refiner's `text_encoder`.
    pub fn says_absent(&self, name: &str) -> bool {
        self.components
            .get(name)
            .and_then(|v| v.as_array())
            .is_some_and(|a| a.iter().all(|x| x.is_null()))
    }
}

/// diffusers writes `null` for a flag left unset (SDXL's `"upcast_attention":
/// null`), and its constructors read it as falsy: `null` is `false`.
fn null_is_false<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// diffusers `UNet2DConditionModel` config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    pub sample_size: Option<PerBlock<usize>>,
    pub in_channels: usize,
    pub out_channels: usize,
    #[serde(deserialize_with = "null_is_false")]
    pub center_input_sample: bool,
    #[serde(deserialize_with = "null_is_false")]
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
    #[serde(deserialize_with = "null_is_false")]
    pub dual_cross_attention: bool,
    #[serde(deserialize_with = "null_is_false")]
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    #[serde(deserialize_with = "null_is_false")]
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub time_embedding_type: String,
    pub time_cond_proj_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub encoder_hid_dim: Option<usize>,
    pub attention_type: String,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub num_class_embeds: Option<usize>,
    #[serde(deserialize_with = "null_is_false")]
    pub class_embeddings_concat: bool,
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    pub mid_block_only_cross_attention: Option<bool>,
    pub cross_attention_norm: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub time_embedding_dim: Option<usize>,
    pub dropout: f64,
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
            attention_type: "default".into(),
            time_embedding_act_fn: None,
            timestep_post_act: None,
            num_class_embeds: None,
            class_embeddings_concat: false,
            reverse_transformer_layers_per_block: None,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            time_embedding_dim: None,
            dropout: 0.0,
        }
    }
}

/// Fails with a message naming `key` unless `ok`.
pub(crate) fn require(
    path: &Path,
    ok: bool,
    key: &str,
    what: impl std::fmt::Display,
) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::model_file(
            path,
            format!(
                "unsupported `{key}`: {what} (sdserve runs Stable Diffusion 1.x, 2.x and XL UNets)"
            ),
        ))
    }
}

/// Fails naming `norm_num_groups` unless `groups` divides every channel count.
pub(crate) fn require_groups_divide(path: &Path, groups: usize, channels: &[usize]) -> Result<()> {
    for &c in channels {
        require(
            path,
            groups > 0 && c.is_multiple_of(groups),
            "norm_num_groups",
            format!("{groups} groups do not divide {c} channels"),
        )?;
    }
    Ok(())
}

impl UNetConfig {
    /// Default image side in pixels is `sample_size * vae_scale_factor`.
    pub fn sample_size(&self) -> Option<usize> {
        self.sample_size.as_ref().and_then(|s| s.get(0))
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
    #[serde(deserialize_with = "null_is_false")]
    pub force_upcast: bool,
    #[serde(deserialize_with = "null_is_false")]
    pub use_quant_conv: bool,
    #[serde(deserialize_with = "null_is_false")]
    pub use_post_quant_conv: bool,
    #[serde(deserialize_with = "null_is_false")]
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
}

/// transformers' `ACT2FN` entries used by CLIP text encoders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `quick_gelu`: x * sigmoid(1.702 x) (SD 1.x).
    QuickGelu,
    /// `gelu`: exact erf GELU (SD 2.x).
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: tanh approximation.
    GeluTanh,
}

impl Activation {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Activation::QuickGelu),
            "gelu" => Some(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            _ => None,
        }
    }
}

/// transformers `CLIPTextConfig` (`text_encoder/config.json`, and SDXL's `text_encoder_2/`).
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
    /// Width of `text_projection` (`CLIPTextModelWithProjection` only: SDXL's second encoder).
    pub projection_dim: usize,
    /// 2 in the SD/SDXL repos' configs: transformers then pools at the largest id
    /// (the legacy `argmax` rule), else at the first `eos_token_id`.
    pub eos_token_id: u32,
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
            projection_dim: 512,
            eos_token_id: 2,
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
            Activation::parse(&self.hidden_act).is_some(),
            "hidden_act",
            &self.hidden_act,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_null_flag_is_false_and_an_absent_one_keeps_its_default() {
        let c: UNetConfig =
            serde_json::from_str(r#"{"upcast_attention": null, "center_input_sample": null}"#)
                .unwrap();
        assert!(!c.upcast_attention && !c.center_input_sample);
        assert!(c.flip_sin_to_cos, "absent: diffusers' default True");
        let c: UNetConfig = serde_json::from_str(r#"{"flip_sin_to_cos": null}"#).unwrap();
        assert!(
            !c.flip_sin_to_cos,
            "null is falsy in diffusers' constructor"
        );
        let v: VaeConfig = serde_json::from_str(r#"{"force_upcast": null}"#).unwrap();
        assert!(!v.force_upcast);
    }
}
