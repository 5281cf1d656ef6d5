//! Reading a model as it sits on disk or in the hub cache: the JSON configs
//! (`model_index.json`, each component's `config.json`) and their checks,
//! where the files are (a folder, an `/opt/ml/model` layout, the HF cache),
//! safetensors weights behind a `VarBuilder` (a diffusers folder's, or one
//! original-layout checkpoint file's under diffusers names), and the CLIP
//! tokenizer.

pub mod config;
pub mod hub;
pub mod single_file;
pub mod tokenizer;
pub mod weights;
