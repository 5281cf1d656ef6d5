//! Reading a model as it sits on disk or in the hub cache: the JSON configs
//! (`model_index.json`, each component's `config.json`) and their checks,
//! where the files are (a folder, an `/opt/ml/model` layout, the HF cache),
//! safetensors weights behind a `VarBuilder`, and the CLIP tokenizer.

pub mod config;
pub mod hub;
pub mod tokenizer;
pub mod weights;
