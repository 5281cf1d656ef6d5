//! Where a model comes from: a local diffusers folder, or a Hugging Face hub repo
//! downloaded into the standard HF cache with hf-hub (its blocking 0.4 API:
//! small, synchronous, the one candle's examples use).
//!
//! Honours `HF_HOME` (cache location), `HF_ENDPOINT`, `HF_TOKEN` and
//! `HF_HUB_OFFLINE=1` (cache only, no network).

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// A `--model` argument, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Local(PathBuf),
    Hub {
        repo: String,
        revision: String,
    },
    /// One `.safetensors` checkpoint in the original layout, with the diffusers
    /// folder whose configs and tokenizers describe it (`--config`).
    SingleFile {
        file: PathBuf,
        config: Option<PathBuf>,
    },
}

/// The files of a diffusers Stable Diffusion repo that sdserve reads, except weights.
const CONFIG_FILES: &[&str] = &[
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "unet/config.json",
    "vae/config.json",
];

/// Weight file stems per component folder.
const WEIGHTS: &[(&str, &str)] = &[
    ("text_encoder", "model"),
    ("unet", "diffusion_pytorch_model"),
    ("vae", "diffusion_pytorch_model"),
];

fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

fn local_hint(repo: &str) -> String {
    format!(
        "to use a model already on disk, pass --model /path/to/folder (an unmodified diffusers \
         folder with model_index.json), or fetch it once with `sdserve download {repo}` where \
         the hub is reachable"
    )
}

impl ModelSource {
    /// An existing path is a local folder; otherwise `org/name` is a hub repo.
    pub fn parse(spec: &str, revision: Option<&str>) -> Result<Self> {
        let path = Path::new(spec);
        if path.exists() {
            if path.is_dir() {
                return Ok(ModelSource::Local(path.to_path_buf()));
            }
            super::single_file::refuse_pickle(path)?;
            if path.extension().is_none_or(|e| e != "safetensors") {
                return Err(Error::model_file(
                    path,
                    "is neither a diffusers model folder nor a .safetensors checkpoint",
                ));
            }
            return Ok(ModelSource::SingleFile {
                file: path.to_path_buf(),
                config: None,
            });
        }
        if looks_like_repo_id(spec) {
            return Ok(ModelSource::Hub {
                repo: spec.to_string(),
                revision: revision.unwrap_or("main").to_string(),
            });
        }
        Err(Error::model_file(
            path,
            "no such folder (--model takes a diffusers model folder or a hub repo id like org/name)",
        ))
    }

    /// Returns a local folder holding the model, downloading hub files not yet
    /// cached. `prefer_fp16` picks `*.fp16.safetensors` weights when a repo has both.
    pub fn resolve(&self, prefer_fp16: bool) -> Result<PathBuf> {
        match self {
            ModelSource::Local(p) => Ok(p.clone()),
            ModelSource::SingleFile { config, .. } => config.clone().ok_or_else(no_config),
            ModelSource::Hub { repo, revision } => {
                if offline() {
                    from_cache(repo, revision)
                } else {
                    download(repo, revision, prefer_fp16)
                }
            }
        }
    }
}

/// A single file's `--config` is missing.
pub fn no_config() -> Error {
    Error::invalid(
        "config",
        "a single-file checkpoint needs --config DIR: a diffusers folder of the same family \
         (SD 1.x, its inpainting variant), whose configs and tokenizers are read, never its \
         weights; sdserve does not bundle the standard configs yet",
    )
}

fn hub_repo(repo: &str, revision: &str) -> Repo {
    Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string())
}

/// HF_HUB_OFFLINE: the snapshot folder in the cache, if `model_index.json` is there.
fn from_cache(repo: &str, revision: &str) -> Result<PathBuf> {
    let cache = Cache::from_env();
    let index = cache.repo(hub_repo(repo, revision)).get("model_index.json");
    match index.as_deref().and_then(Path::parent) {
        Some(dir) => Ok(dir.to_path_buf()),
        None => Err(Error::Hub(format!(
            "HF_HUB_OFFLINE is set and {repo} (revision {revision}) is not in the HF cache at {}; {}",
            cache.path().display(),
            local_hint(repo)
        ))),
    }
}

/// Downloads the configs, tokenizer and the chosen weight variant of `repo`.
fn download(repo: &str, revision: &str, prefer_fp16: bool) -> Result<PathBuf> {
    let unreachable = |e: &dyn std::fmt::Display| {
        Error::Hub(format!(
            "cannot download {repo} (revision {revision}) from the Hugging Face hub: {e}; {}",
            local_hint(repo)
        ))
    };
    let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
    let api = ApiBuilder::from_env()
        .with_progress(true)
        .with_token(token.or_else(|| Cache::from_env().token()))
        .build()
        .map_err(|e| unreachable(&e))?;
    let api_repo = api.repo(hub_repo(repo, revision));
    let info = api_repo.info().map_err(|e| unreachable(&e))?;
    let present: std::collections::HashSet<&str> =
        info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    if !present.contains("model_index.json") {
        return Err(Error::Hub(format!(
            "{repo} has no model_index.json: it is not a diffusers pipeline repo"
        )));
    }
    let mut wanted: Vec<String> = CONFIG_FILES
        .iter()
        .filter(|f| present.contains(**f))
        .map(|f| f.to_string())
        .collect();
    for (folder, stem) in WEIGHTS {
        let order = if prefer_fp16 {
            [".fp16", ""]
        } else {
            ["", ".fp16"]
        };
        let single = order
            .iter()
            .map(|v| format!("{folder}/{stem}{v}.safetensors"))
            .find(|f| present.contains(f.as_str()));
        match single {
            Some(f) => wanted.push(f),
            None => {
                // Sharded weights: every file named `<stem>...-of-...safetensors` plus its index.
                let prefix = format!("{folder}/{stem}");
                let shards: Vec<String> = present
                    .iter()
                    .filter(|f| {
                        f.starts_with(&prefix)
                            && (f.ends_with(".safetensors") || f.ends_with(".json"))
                    })
                    .map(|f| f.to_string())
                    .collect();
                if shards.is_empty() {
                    return Err(Error::Hub(format!(
                        "{repo} has no safetensors weights under {folder}/ (sdserve does not load .bin pickles)"
                    )));
                }
                wanted.extend(shards);
            }
        }
    }
    let mut root = None;
    for f in &wanted {
        let path = api_repo.get(f).map_err(|e| unreachable(&e))?;
        if f == "model_index.json" {
            root = path.parent().map(Path::to_path_buf);
        }
    }
    root.ok_or_else(|| Error::Hub(format!("{repo}: model_index.json did not download")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_paths() {
        assert!(looks_like_repo_id(
            "stable-diffusion-v1-5/stable-diffusion-v1-5"
        ));
        assert!(looks_like_repo_id("stabilityai/stable-diffusion-2-1"));
        assert!(!looks_like_repo_id("./models/sd"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
        let err = ModelSource::parse("./definitely/not/here", None).unwrap_err();
        assert!(err.to_string().contains("no such folder"), "{err}");
        assert_eq!(
            ModelSource::parse("org/name", Some("v2")).unwrap(),
            ModelSource::Hub {
                repo: "org/name".into(),
                revision: "v2".into()
            }
        );
    }
}
