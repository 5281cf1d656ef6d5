//! Finding and opening a component's safetensors weights the way diffusers'
//! `from_pretrained` does: `diffusion_pytorch_model.safetensors` (UNet, VAE) or
//! `model.safetensors` (text encoder), the `.fp16.` variant, or shards listed
//! in a `*.safetensors.index.json`.

use std::path::{Path, PathBuf};

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use safetensors::tensor::TensorView;

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

    /// A `VarBuilder` over the files. Each tensor is read from its file when a layer
    /// asks for it (positioned reads into a buffer, converted to `dtype` on `device`),
    /// never memory-mapped: a mapping would keep every weight's file pages resident
    /// in this process beside the loaded copy until the builder is dropped, doubling
    /// peak memory at load (the full-size UNet: 3.4 GB twice). A truncated or corrupt
    /// file is named in the error.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let reader = SafetensorsReader::open(&self.files)?;
        Ok(VarBuilder::from_backend(
            Box::new(reader),
            dtype,
            device.clone(),
        ))
    }

    pub fn describe(&self) -> PathBuf {
        self.files.first().cloned().unwrap_or_default()
    }
}

/// Where one tensor is: which file, its stored dtype and shape, and its byte range.
#[derive(Debug)]
struct Entry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    start: u64,
    len: usize,
}

/// The tensors of one or more safetensors files, read on demand with positioned
/// reads (the safetensors format: an 8-byte little-endian header length, a JSON
/// header of `name: {dtype, shape, data_offsets}`, then the data).
pub(super) struct SafetensorsReader {
    files: Vec<(PathBuf, File)>,
    index: HashMap<String, Entry>,
}

/// The header fields sdserve reads (safetensors' `TensorInfo`).
#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// Largest header accepted (safetensors' own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

impl SafetensorsReader {
    pub(super) fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let bad = |what: String| {
                Error::model_file(
                    path,
                    format!("not a valid safetensors file (truncated or corrupt?): {what}"),
                )
            };
            let file = File::open(path).map_err(|e| Error::model_file(path, e))?;
            let file_len = file
                .metadata()
                .map_err(|e| Error::model_file(path, e))?
                .len();
            let mut len_bytes = [0u8; 8];
            file.read_exact_at(&mut len_bytes, 0)
                .map_err(|_| bad(format!("{file_len} bytes, no header")))?;
            let header_len = u64::from_le_bytes(len_bytes);
            if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
                return Err(bad(format!(
                    "header of {header_len} bytes in a {file_len}-byte file"
                )));
            }
            let mut header = vec![0u8; header_len as usize];
            file.read_exact_at(&mut header, 8)
                .map_err(|e| bad(e.to_string()))?;
            let mut entries: HashMap<String, serde_json::Value> =
                serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
            entries.remove("__metadata__");
            let data_start = 8 + header_len;
            for (name, value) in entries {
                let e: HeaderEntry = serde_json::from_value(value)
                    .map_err(|e| bad(format!("tensor {name}: {e}")))?;
                let (begin, end) = e.data_offsets;
                // Sizes and offsets come from the file: checked, never wrapped.
                let expected = e
                    .shape
                    .iter()
                    .try_fold(e.dtype.bitsize(), |acc, &d| acc.checked_mul(d))
                    .map(|bits| bits.div_ceil(8));
                let Some(expected) = expected.filter(|&n| end.checked_sub(begin) == Some(n)) else {
                    return Err(bad(format!(
                        "tensor {name}: bytes {begin}..{end} for {:?} {:?}",
                        e.dtype, e.shape
                    )));
                };
                let file_end = (end as u64).checked_add(data_start);
                if file_end.is_none_or(|file_end| file_end > file_len) {
                    return Err(bad(format!(
                        "tensor {name} ends past the end of the {file_len}-byte file"
                    )));
                }
                if index.contains_key(&name) {
                    return Err(bad(format!("tensor {name} is also in an earlier file")));
                }
                let entry = Entry {
                    file: i,
                    dtype: e.dtype,
                    shape: e.shape,
                    start: data_start + begin as u64,
                    len: expected,
                };
                index.insert(name, entry);
            }
            files.push((path.clone(), file));
        }
        Ok(Self { files, index })
    }

    /// Reads `name` from its file onto `device`, converted to `dtype`.
    /// The stored shape of `name`, if the files hold it.
    pub(super) fn shape(&self, name: &str) -> Option<&[usize]> {
        self.index.get(name).map(|e| e.shape.as_slice())
    }

    /// Every tensor name the files hold.
    pub(super) fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub(super) fn read(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let entry = self.index.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })?;
        let (path, file) = &self.files[entry.file];
        let fail = |e: &dyn std::fmt::Display| {
            candle_core::Error::Msg(format!("{}: {name}: {e}", path.display()))
        };
        let io = |e: std::io::Error| fail(&e);
        // Stored as wanted (the usual case): read straight into the tensor's buffer.
        let shape = entry.shape.as_slice();
        match (entry.dtype, dtype) {
            (safetensors::Dtype::F32, DType::F32) => {
                return Tensor::from_vec(
                    self.read_elements::<f32>(entry).map_err(io)?,
                    shape,
                    device,
                );
            }
            (safetensors::Dtype::F16, DType::F16) => {
                return Tensor::from_vec(
                    self.read_elements::<half::f16>(entry).map_err(io)?,
                    shape,
                    device,
                );
            }
            (safetensors::Dtype::BF16, DType::BF16) => {
                return Tensor::from_vec(
                    self.read_elements::<half::bf16>(entry).map_err(io)?,
                    shape,
                    device,
                );
            }
            _ => {}
        }
        let mut bytes = vec![0u8; entry.len];
        file.read_exact_at(&mut bytes, entry.start).map_err(io)?;
        let view =
            TensorView::new(entry.dtype, entry.shape.clone(), &bytes).map_err(|e| fail(&e))?;
        view.load(device)?.to_dtype(dtype)
    }

    /// `entry`'s data as `T`s, read from the file into the vector's own memory (the
    /// stored dtype must be `T`'s; safetensors is little-endian, as are the CPUs
    /// sdserve runs on).
    fn read_elements<T: candle_core::WithDType>(&self, entry: &Entry) -> std::io::Result<Vec<T>> {
        let count = entry.len / std::mem::size_of::<T>();
        let mut data = vec![T::from_f64(0.0); count];
        // SAFETY: the byte view covers exactly `data`'s initialised elements, and any
        // bit pattern is a valid f32/f16/bf16.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                data.as_mut_ptr().cast::<u8>(),
                count * std::mem::size_of::<T>(),
            )
        };
        self.files[entry.file].1.read_exact_at(bytes, entry.start)?;
        Ok(data)
    }
}

impl SimpleBackend for SafetensorsReader {
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
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
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
        self.index.contains_key(name)
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

    #[test]
    fn reads_tensors_on_demand_and_refuses_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let a = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &Device::Cpu).unwrap();
        let tensors = HashMap::from([
            ("a.weight".to_string(), a.to_dtype(DType::F16).unwrap()),
            ("b".to_string(), Tensor::new(&[7f32], &Device::Cpu).unwrap()),
        ]);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let reader = SafetensorsReader::open(std::slice::from_ref(&path)).unwrap();
        let got = reader
            .get(
                (2, 3).into(),
                "a.weight",
                Default::default(),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        assert_eq!(got.dtype(), DType::F32);
        assert_eq!(got.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        assert!(reader.contains_tensor("b") && !reader.contains_tensor("c"));
        let err = reader
            .get(
                (3, 2).into(),
                "a.weight",
                Default::default(),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("shape mismatch for a.weight"),
            "{err}"
        );
        assert!(reader.get_unchecked("c", DType::F32, &Device::Cpu).is_err());

        let bytes = std::fs::read(&path).unwrap();
        let corrupt = |data: &[u8], expect: &str| {
            let bad = dir.path().join("bad.safetensors");
            std::fs::write(&bad, data).unwrap();
            let err = SafetensorsReader::open(&[bad]).err().unwrap().to_string();
            assert!(
                err.contains("bad.safetensors")
                    && err.contains("truncated or corrupt")
                    && err.contains(expect),
                "{err}"
            );
        };
        corrupt(&bytes[..bytes.len() - 2], "ends past the end");
        corrupt(&bytes[..5], "no header");
        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        corrupt(&huge, "header of");
        // Header values chosen to overflow size and offset arithmetic.
        let with_header = |json: &str| {
            let mut data = (json.len() as u64).to_le_bytes().to_vec();
            data.extend_from_slice(json.as_bytes());
            data.extend_from_slice(&[0u8; 16]);
            data
        };
        corrupt(
            &with_header(
                r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#,
            ),
            "bytes 0..0",
        );
        corrupt(
            &with_header(
                r#"{"w":{"dtype":"F32","shape":[],"data_offsets":[18446744073709551611,18446744073709551615]}}"#,
            ),
            "ends past the end",
        );
        let mut garbled = bytes.clone();
        garbled[8] = b'!';
        corrupt(&garbled, "header:");
    }
}
