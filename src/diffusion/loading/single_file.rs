//! Single-file checkpoints: one `.safetensors` in the original CompVis / A1111
//! layout (`model.diffusion_model.*`, `first_stage_model.*`,
//! `cond_stage_model.*`), as model sites share them. The family is read off
//! the keys as diffusers' `infer_diffusers_model_type` does
//! (`loaders/single_file_utils.py`, `CHECKPOINT_KEY_NAMES`), and each
//! component is served to the model builders under its diffusers names: the
//! renaming of `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`
//! (with `conv_attn_to_linear`) and `convert_ldm_clip_checkpoint`, done on the
//! names once, each tensor read from the file when a layer asks for it.
//! Pickle files (`.ckpt`, `.pt`, `.bin`) are refused: sdserve never unpickles.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use super::weights::SafetensorsReader;
use crate::error::{Error, Result};

/// The architectures a checkpoint's keys tell apart (diffusers' model types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFamily {
    /// SD 1.x (`v1`), or its 9-channel inpainting variant (`inpainting`).
    V1 { inpainting: bool },
    /// SD 2.x: 1024-wide cross-attention (`v2`, `inpainting_v2`).
    V2 { inpainting: bool },
    /// SDXL base (`xl_base`, `xl_inpaint`).
    XlBase { inpainting: bool },
    /// The SDXL refiner (`xl_refiner`).
    XlRefiner,
}

impl CheckpointFamily {
    pub fn is_xl(self) -> bool {
        matches!(self, Self::XlBase { .. } | Self::XlRefiner)
    }

    pub fn inpainting(self) -> bool {
        match self {
            Self::V1 { inpainting } | Self::V2 { inpainting } | Self::XlBase { inpainting } => {
                inpainting
            }
            Self::XlRefiner => false,
        }
    }

    /// What diffusers calls it.
    pub fn name(self) -> &'static str {
        match self {
            Self::V1 { inpainting: false } => "SD 1.x (v1)",
            Self::V1 { inpainting: true } => "SD 1.x inpainting",
            Self::V2 { inpainting: false } => "SD 2.x (v2)",
            Self::V2 { inpainting: true } => "SD 2.x inpainting",
            Self::XlBase { inpainting: false } => "SDXL base",
            Self::XlBase { inpainting: true } => "SDXL inpainting",
            Self::XlRefiner => "SDXL refiner",
        }
    }
}

const UNET_PREFIX: &str = "model.diffusion_model.";
/// `LDM_VAE_KEYS`: the VAE's prefix in CompVis checkpoints, and in some others.
const VAE_PREFIXES: [&str; 2] = ["first_stage_model.", "vae."];
/// `LDM_CLIP_PREFIX_TO_REMOVE`'s SD 1.x entry: transformers' CLIPTextModel names follow.
const CLIP_PREFIX: &str = "cond_stage_model.transformer.";

/// Extensions of pickle files, which can run code when read.
const PICKLE_EXTENSIONS: [&str; 5] = ["ckpt", "pt", "pth", "bin", "pkl"];

/// Whether `path` names a pickle checkpoint; the error says what to do instead.
pub fn refuse_pickle(path: &Path) -> Result<()> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    if ext.is_some_and(|e| PICKLE_EXTENSIONS.contains(&e.as_str())) {
        return Err(Error::model_file(
            path,
            "is a pickle file, which can run code when it is read: sdserve never unpickles. \
             Use the model's .safetensors file, or convert it once in a sandbox (safetensors' \
             `convert.py`)",
        ));
    }
    Ok(())
}

/// One checkpoint file, opened (its header read) but no tensor loaded.
pub struct Checkpoint {
    path: PathBuf,
    reader: Arc<SafetensorsReader>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// A tensor's name in the file and what turns it into the diffusers one.
#[derive(Debug, Clone)]
struct Source {
    name: String,
    /// The VAE's attention projections are 1x1 convolutions in LDM
    /// (`conv_attn_to_linear`: `[:, :, 0, 0]`).
    conv_to_linear: bool,
}

/// A component's tensors under their diffusers names.
struct Renamed {
    reader: Arc<SafetensorsReader>,
    names: HashMap<String, Source>,
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Self> {
        refuse_pickle(path)?;
        let reader = SafetensorsReader::open(&[path.to_path_buf()])?;
        Ok(Self {
            path: path.to_path_buf(),
            reader: Arc::new(reader),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// diffusers' `infer_diffusers_model_type`, for the Stable Diffusion types.
    pub fn family(&self) -> Result<CheckpointFamily> {
        let has = |k: &str| self.reader.shape(k).is_some();
        let last_dim = |k: &str| self.reader.shape(k).and_then(|s| s.last().copied());
        let conv_in = self
            .reader
            .shape("model.diffusion_model.input_blocks.0.0.weight");
        let inpainting = conv_in.is_some_and(|s| s.get(1) == Some(&9));
        let v2 = last_dim(
            "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
        ) == Some(1024);
        let xl_base = has("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias");
        let xl_refiner =
            has("conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias");
        let family = if v2 {
            CheckpointFamily::V2 { inpainting }
        } else if xl_base {
            CheckpointFamily::XlBase { inpainting }
        } else if xl_refiner && !inpainting {
            CheckpointFamily::XlRefiner
        } else if conv_in.is_some()
            && has(&format!(
                "{CLIP_PREFIX}text_model.embeddings.position_embedding.weight"
            ))
        {
            CheckpointFamily::V1 { inpainting }
        } else {
            return Err(Error::model_file(
                &self.path,
                "is not a Stable Diffusion checkpoint sdserve knows: no SD 1.x/2.x/SDXL UNet and \
                 text encoder keys (model.diffusion_model.input_blocks.0.0.weight, \
                 cond_stage_model.transformer.text_model.*, conditioner.embedders.*)",
            ));
        };
        Ok(family)
    }

    /// The UNet under diffusers' `UNet2DConditionModel` names
    /// (`convert_ldm_unet_checkpoint`; `layers_per_block` from its config).
    pub fn unet(
        &self,
        layers_per_block: usize,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        let names = self.renamed(UNET_PREFIX, |k| unet_name(k, layers_per_block).map(plain));
        self.var_builder(names, dtype, device)
    }

    /// The VAE under diffusers' `AutoencoderKL` names (`convert_ldm_vae_checkpoint`;
    /// the number of up blocks from its config).
    pub fn vae(&self, up_blocks: usize, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let prefix = VAE_PREFIXES
            .into_iter()
            .find(|p| self.reader.names().any(|k| k.starts_with(p)))
            .unwrap_or(VAE_PREFIXES[0]);
        let names = self.renamed(prefix, |k| vae_name(k, up_blocks));
        self.var_builder(names, dtype, device)
    }

    /// SD 1.x's text encoder under transformers' `CLIPTextModel` names
    /// (`convert_ldm_clip_checkpoint`: the prefix dropped).
    pub fn clip(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let names = self.renamed(CLIP_PREFIX, |k| Some(plain(k.to_string())));
        self.var_builder(names, dtype, device)
    }

    /// Every key under `prefix` that `rename` maps, by its diffusers name.
    fn renamed(
        &self,
        prefix: &str,
        rename: impl Fn(&str) -> Option<(String, bool)>,
    ) -> HashMap<String, Source> {
        self.reader
            .names()
            .filter_map(|key| {
                let (name, conv_to_linear) = rename(key.strip_prefix(prefix)?)?;
                let source = Source {
                    name: key.to_string(),
                    conv_to_linear,
                };
                Some((name, source))
            })
            .collect()
    }

    fn var_builder(
        &self,
        names: HashMap<String, Source>,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        let backend = Renamed {
            reader: Arc::clone(&self.reader),
            names,
        };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }
}

fn plain(name: String) -> (String, bool) {
    (name, false)
}

/// `update_unet_resnet_ldm_to_diffusers`'s renames inside a resnet.
const RESNET_PARTS: [(&str, &str); 6] = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
];

fn resnet_part(rest: &str) -> Option<String> {
    RESNET_PARTS.iter().find_map(|(old, new)| {
        let tail = rest.strip_prefix(old)?.strip_prefix('.')?;
        Some(format!("{new}.{tail}"))
    })
}

/// `(index, rest)` of `"{index}.{rest}"`.
fn numbered(s: &str) -> Option<(usize, &str)> {
    let (i, rest) = s.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

/// The diffusers name of a UNet key (without `model.diffusion_model.`), as
/// `convert_ldm_unet_checkpoint` maps it; `None` for keys it drops.
fn unet_name(key: &str, layers_per_block: usize) -> Option<String> {
    let fixed = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        // SDXL's text_time embedding (`addition_embed_type`)
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
    ];
    for (old, new) in fixed {
        if let Some(tail) = key.strip_prefix(old) {
            return Some(format!("{new}{tail}"));
        }
    }
    let per = layers_per_block + 1;
    if let Some(rest) = key.strip_prefix("input_blocks.") {
        let (i, rest) = numbered(rest)?;
        let (block, layer) = ((i.checked_sub(1)?) / per, (i - 1) % per);
        let (part, rest) = numbered(rest)?;
        return match part {
            0 => match rest.strip_prefix("op.") {
                Some(tail) => Some(format!("down_blocks.{block}.downsamplers.0.conv.{tail}")),
                None => Some(format!(
                    "down_blocks.{block}.resnets.{layer}.{}",
                    resnet_part(rest)?
                )),
            },
            1 => Some(format!("down_blocks.{block}.attentions.{layer}.{rest}")),
            _ => None,
        };
    }
    if let Some(rest) = key.strip_prefix("middle_block.") {
        let (i, rest) = numbered(rest)?;
        return match i {
            1 => Some(format!("mid_block.attentions.0.{rest}")),
            0 | 2 => Some(format!(
                "mid_block.resnets.{}.{}",
                i / 2,
                resnet_part(rest)?
            )),
            _ => None,
        };
    }
    if let Some(rest) = key.strip_prefix("output_blocks.") {
        let (i, rest) = numbered(rest)?;
        let (block, layer) = (i / per, i % per);
        let (part, rest) = numbered(rest)?;
        if let Some(tail) = rest.strip_prefix("conv.").filter(|_| part > 0) {
            return Some(format!("up_blocks.{block}.upsamplers.0.conv.{tail}"));
        }
        return match part {
            0 => Some(format!(
                "up_blocks.{block}.resnets.{layer}.{}",
                resnet_part(rest)?
            )),
            1 => Some(format!("up_blocks.{block}.attentions.{layer}.{rest}")),
            _ => None,
        };
    }
    None
}

/// `update_vae_attentions_ldm_to_diffusers`'s renames in the mid-block attention.
const VAE_ATTENTION_PARTS: [(&str, &str); 5] = [
    ("norm", "group_norm"),
    ("q", "to_q"),
    ("k", "to_k"),
    ("v", "to_v"),
    ("proj_out", "to_out.0"),
];

/// The diffusers name of a VAE key (without its prefix), as
/// `convert_ldm_vae_checkpoint` maps it, and whether it is an attention
/// projection stored as a 1x1 convolution.
fn vae_name(key: &str, up_blocks: usize) -> Option<(String, bool)> {
    if matches!(
        key.split_once('.'),
        Some(("quant_conv" | "post_quant_conv", _))
    ) {
        return Some(plain(key.to_string()));
    }
    let (side, rest) = key.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let resnet = |s: &str| s.replace("nin_shortcut", "conv_shortcut");
    let inner = if let Some(tail) = rest.strip_prefix("norm_out.") {
        format!("conv_norm_out.{tail}")
    } else if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        rest.to_string()
    } else if let Some(r) = rest.strip_prefix("down.") {
        let (i, r) = numbered(r)?;
        if let Some(r) = r.strip_prefix("block.") {
            let (j, tail) = numbered(r)?;
            format!("down_blocks.{i}.resnets.{j}.{}", resnet(tail))
        } else {
            format!(
                "down_blocks.{i}.downsamplers.0.conv.{}",
                r.strip_prefix("downsample.conv.")?
            )
        }
    } else if let Some(r) = rest.strip_prefix("up.") {
        let (i, r) = numbered(r)?;
        let block = up_blocks.checked_sub(1)?.checked_sub(i)?;
        if let Some(r) = r.strip_prefix("block.") {
            let (j, tail) = numbered(r)?;
            format!("up_blocks.{block}.resnets.{j}.{}", resnet(tail))
        } else {
            format!(
                "up_blocks.{block}.upsamplers.0.conv.{}",
                r.strip_prefix("upsample.conv.")?
            )
        }
    } else if let Some(r) = rest.strip_prefix("mid.block_") {
        let (i, tail) = numbered(r)?;
        format!("mid_block.resnets.{}.{}", i.checked_sub(1)?, resnet(tail))
    } else if let Some(r) = rest.strip_prefix("mid.attn_1.") {
        let (part, param) = r.rsplit_once('.')?;
        let (_, new) = VAE_ATTENTION_PARTS.iter().find(|(old, _)| *old == part)?;
        let projection = part != "norm" && param == "weight";
        return Some((
            format!("{side}.mid_block.attentions.0.{new}.{param}"),
            projection,
        ));
    } else {
        return None;
    };
    Some(plain(format!("{side}.{inner}")))
}

impl Renamed {
    fn read(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let Some(source) = self.names.get(name) else {
            return Err(candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt());
        };
        let t = self.reader.read(&source.name, dtype, device)?;
        match t.dims() {
            [o, i, 1, 1] if source.conv_to_linear => t.reshape((*o, *i)),
            _ => Ok(t),
        }
    }
}

impl SimpleBackend for Renamed {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.read(name, dtype, device)?;
        if tensor.shape() != &shape {
            let source = self.names.get(name).map_or(name, |s| s.name.as_str());
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {source} (read as {name})"),
                expected: shape,
                got: tensor.shape().clone(),
            }
            .bt());
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.read(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_names_follow_convert_ldm_unet_checkpoint() {
        let cases = [
            ("time_embed.0.weight", "time_embedding.linear_1.weight"),
            ("input_blocks.0.0.bias", "conv_in.bias"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.1.proj_in.weight",
                "down_blocks.0.attentions.1.proj_in.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.0.skip_connection.bias",
                "down_blocks.1.resnets.0.conv_shortcut.bias",
            ),
            (
                "middle_block.0.emb_layers.1.weight",
                "mid_block.resnets.0.time_emb_proj.weight",
            ),
            (
                "middle_block.1.norm.bias",
                "mid_block.attentions.0.norm.bias",
            ),
            (
                "middle_block.2.out_layers.3.weight",
                "mid_block.resnets.1.conv2.weight",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.5.1.transformer_blocks.0.attn1.to_q.weight",
                "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q.weight",
            ),
            (
                "output_blocks.3.0.out_layers.0.bias",
                "up_blocks.1.resnets.0.norm2.bias",
            ),
            ("out.2.weight", "conv_out.weight"),
            ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(unet_name(ldm, 2).as_deref(), Some(diffusers), "{ldm}");
        }
        assert_eq!(unet_name("input_blocks.1.7.weight", 2), None);
    }

    #[test]
    fn vae_names_follow_convert_ldm_vae_checkpoint() {
        let cases = [
            (
                "encoder.norm_out.weight",
                "encoder.conv_norm_out.weight",
                false,
            ),
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                false,
            ),
            (
                "encoder.down.0.downsample.conv.bias",
                "encoder.down_blocks.0.downsamplers.0.conv.bias",
                false,
            ),
            (
                "decoder.up.3.block.2.conv1.weight",
                "decoder.up_blocks.0.resnets.2.conv1.weight",
                false,
            ),
            (
                "decoder.up.1.upsample.conv.weight",
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                false,
            ),
            (
                "decoder.mid.block_2.norm1.bias",
                "decoder.mid_block.resnets.1.norm1.bias",
                false,
            ),
            (
                "decoder.mid.attn_1.q.weight",
                "decoder.mid_block.attentions.0.to_q.weight",
                true,
            ),
            (
                "decoder.mid.attn_1.proj_out.bias",
                "decoder.mid_block.attentions.0.to_out.0.bias",
                false,
            ),
            (
                "encoder.mid.attn_1.norm.weight",
                "encoder.mid_block.attentions.0.group_norm.weight",
                false,
            ),
            ("post_quant_conv.weight", "post_quant_conv.weight", false),
        ];
        for (ldm, diffusers, conv) in cases {
            assert_eq!(
                vae_name(ldm, 4),
                Some((diffusers.to_string(), conv)),
                "{ldm}"
            );
        }
    }

    #[test]
    fn pickles_are_refused_by_extension() {
        for name in ["model.ckpt", "x.PT", "pytorch_model.bin"] {
            let e = refuse_pickle(Path::new(name)).unwrap_err().to_string();
            assert!(e.contains("never unpickles"), "{e}");
        }
        assert!(refuse_pickle(Path::new("model.safetensors")).is_ok());
    }
}
