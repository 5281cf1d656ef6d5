//! Finding and opening a component's safetensors weights the way diffusers'
//! `from_pretrained` does: `diffusion_pytorch_model.safetensors` (UNet, VAE) or
//! `model.safetensors` (text encoder), the `.fp16.` variant, or shards listed
//! in a `*.safetensors.index.json`.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

/// The files holding one component's weights.
#[derive(Debug, Clone)]
pub struct WeightFiles {
    pub files: Vec<PathBuf>,
}

/// Candidate file names for `base` in preference order.
fn candidates(base: &str, prefer_fp16: bool) -> Vec<String> {
    let full = [
        format!("{base}.safetensors"),
        format!("{base}.safetensors.index.json"),
    ];
    let half = [
        format!("{base}.fp16.safetensors"),
        format!("{base}.safetensors.index.fp16.json"),
        format!("{base}.fp16.safetensors.index.json"),
    ];
    if prefer_fp16 {
        half.into_iter().chain(full).collect()
    } else {
        full.into_iter().chain(half).collect()
    }
}

/// Lists the shard files of a `*.safetensors.index.json`.
fn shards(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::model_file(index, e))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::model_file(index, format!("invalid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::model_file(index, "no `weight_map` object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|v| v.as_str())
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

impl WeightFiles {
    /// Locates `dir/<base>[.fp16].safetensors` (or its shards). `prefer_fp16`
    /// picks the half-precision variant first when both exist.
    pub fn find(dir: &Path, base: &str, prefer_fp16: bool) -> Result<Self> {
        for name in candidates(base, prefer_fp16) {
            let path = dir.join(&name);
            if !path.is_file() {
                continue;
            }
            let files = if name.ends_with(".json") {
                shards(&path)?
            } else {
                vec![path]
            };
            if let Some(missing) = files.iter().find(|f| !f.is_file()) {
                return Err(Error::model_file(
                    missing,
                    "missing (listed in the shard index)",
                ));
            }
            return Ok(Self { files });
        }
        let expected = dir.join(format!("{base}.safetensors"));
        let bin = dir.join(format!("{base}.bin"));
        let message = if bin.is_file() {
            format!(
                "missing; only the PyTorch pickle {} exists, which sdserve does not load \
                 (convert it to safetensors, e.g. with diffusers' save_pretrained(safe_serialization=True))",
                bin.display()
            )
        } else {
            "missing (expected the component's safetensors weights)".to_string()
        };
        Err(Error::model_file(expected, message))
    }

    /// Memory-maps the files, checking each one's safetensors header so a
    /// truncated or corrupt file is named in the error.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        for f in &self.files {
            // SAFETY: the file is mapped read-only; like every safetensors loader we
            // rely on it not being modified while the model is loaded.
            unsafe { MmapedSafetensors::new(f) }.map_err(|e| {
                Error::model_file(
                    f,
                    format!("not a valid safetensors file (truncated or corrupt?): {e}"),
                )
            })?;
        }
        // SAFETY: as above.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&self.files, dtype, device) }
            .map_err(|e| Error::model_file(&self.files[0], e))?;
        Ok(vb)
    }

    /// The file name to mention in errors about this component's weights.
    pub fn describe(&self) -> PathBuf {
        self.files.first().cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_the_variant_matching_the_dtype() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["model.safetensors", "model.fp16.safetensors"] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        let full = WeightFiles::find(dir.path(), "model", false).unwrap();
        assert_eq!(full.files, vec![dir.path().join("model.safetensors")]);
        let half = WeightFiles::find(dir.path(), "model", true).unwrap();
        assert_eq!(half.files, vec![dir.path().join("model.fp16.safetensors")]);
        // Only one variant present: it is used whatever the preference.
        std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
        let only = WeightFiles::find(dir.path(), "model", false).unwrap();
        assert_eq!(only.files, vec![dir.path().join("model.fp16.safetensors")]);
    }

    #[test]
    fn sharded_weights_list_every_shard_once() {
        let dir = tempfile::tempdir().unwrap();
        let index = r#"{"metadata": {}, "weight_map": {
            "a": "m-00001-of-00002.safetensors",
            "b": "m-00002-of-00002.safetensors",
            "c": "m-00001-of-00002.safetensors"}}"#;
        std::fs::write(dir.path().join("m.safetensors.index.json"), index).unwrap();
        std::fs::write(dir.path().join("m-00001-of-00002.safetensors"), b"x").unwrap();
        let err = WeightFiles::find(dir.path(), "m", false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m-00002-of-00002.safetensors") && err.contains("shard index"),
            "{err}"
        );
        std::fs::write(dir.path().join("m-00002-of-00002.safetensors"), b"x").unwrap();
        let w = WeightFiles::find(dir.path(), "m", false).unwrap();
        assert_eq!(w.files.len(), 2);
    }
}
