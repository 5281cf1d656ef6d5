//! CLIP tokenization as diffusers runs it: transformers' `CLIPTokenizer`
//! (transformers 5, `models/clip/tokenization_clip.py`) built from the model's
//! `tokenizer/vocab.json` + `merges.txt`, then `tokenizer(prompt,
//! padding="max_length", max_length=tokenizer.model_max_length, truncation=True)`
//! as in `StableDiffusionPipeline.encode_prompt`.
//!
//! Pipeline: NFC, collapse whitespace, lowercase; split with CLIP's regex; byte-level
//! alphabet; BPE with the `</w>` end-of-word suffix; BOS + tokens (truncated) + EOS,
//! padded with the tokenizer's pad token (`<|endoftext|>` for SD 1.x, `!` for SD 2.x).

use std::path::Path;

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormSeq};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

/// The pre-tokenization regex of transformers' `CLIPTokenizer`.
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("max_len", &self.max_len)
            .finish()
    }
}

/// A special token in `tokenizer_config.json` / `special_tokens_map.json` is a
/// string or an AddedToken dict with a `content` field.
fn token_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_optional_json(path: &Path) -> Result<Option<serde_json::Map<String, Value>>> {
    match std::fs::read_to_string(path) {
        Ok(text) => match serde_json::from_str(&text) {
            Ok(Value::Object(m)) => Ok(Some(m)),
            Ok(_) => Err(Error::model_file(path, "expected a JSON object")),
            Err(e) => Err(Error::model_file(path, format!("invalid JSON: {e}"))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::model_file(path, e)),
    }
}

impl ClipTokenizer {
    /// Loads `dir/vocab.json` and `dir/merges.txt`; special tokens and the maximum
    /// length come from `special_tokens_map.json` / `tokenizer_config.json` when
    /// present (CLIP's defaults otherwise), capped at `max_positions`.
    pub fn from_dir(dir: &Path, max_positions: usize) -> Result<Self> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        for f in [&vocab, &merges] {
            if !f.is_file() {
                return Err(Error::model_file(
                    f,
                    "missing (the tokenizer folder needs vocab.json and merges.txt)",
                ));
            }
        }
        let (vocab_s, merges_s) = (vocab.to_string_lossy(), merges.to_string_lossy());
        let bpe = BPE::from_file(&vocab_s, &merges_s)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_string())
            .unk_token("<|endoftext|>".to_string())
            .build()
            .map_err(|e| {
                Error::model_file(
                    &vocab,
                    format!("cannot build BPE from vocab.json + merges.txt: {e}"),
                )
            })?;

        let config = read_optional_json(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let special = read_optional_json(&dir.join("special_tokens_map.json"))?.unwrap_or_default();
        // special_tokens_map.json wins over tokenizer_config.json, as in transformers.
        let lookup = |key: &str, default: &str| -> String {
            special
                .get(key)
                .and_then(token_string)
                .or_else(|| config.get(key).and_then(token_string))
                .unwrap_or_else(|| default.to_string())
        };
        let (bos_s, eos_s, pad_s) = (
            lookup("bos_token", "<|startoftext|>"),
            lookup("eos_token", "<|endoftext|>"),
            lookup("pad_token", "<|endoftext|>"),
        );

        let mut inner = Tokenizer::new(bpe);
        let normalizer = NormSeq::new(vec![
            NFC.into(),
            Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
                .map_err(|e| Error::model_file(dir, e))?
                .into(),
            Lowercase.into(),
        ]);
        inner
            .with_normalizer(Some(normalizer))
            .map_err(|e| Error::model_file(dir, e))?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| Error::model_file(dir, e))?;
        // transformers: `pre_tokenizers.ByteLevel(add_prefix_space=False)`, which
        // keeps the defaults trim_offsets=True, use_regex=True.
        inner.with_pre_tokenizer(Some(PreSeq::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        // transformers registers bos/eos/unk/pad as special tokens, so e.g. SD 2.x's
        // pad token `!` always encodes as one token, never merged by BPE.
        let unk_s = lookup("unk_token", "<|endoftext|>");
        let mut specials: Vec<&String> = vec![&bos_s, &eos_s, &unk_s, &pad_s];
        specials.dedup();
        inner
            .add_special_tokens(specials.iter().map(|t| AddedToken::from(t.as_str(), true)))
            .map_err(|e| Error::model_file(dir, e))?;

        let id = |tok: &str| {
            inner.token_to_id(tok).ok_or_else(|| {
                Error::model_file(
                    &vocab,
                    format!("special token {tok:?} is not in the vocabulary"),
                )
            })
        };
        let (bos, eos, pad) = (id(&bos_s)?, id(&eos_s)?, id(&pad_s)?);
        let model_max = config
            .get("model_max_length")
            .and_then(Value::as_f64)
            .map(|v| v as usize)
            .unwrap_or(max_positions);
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            max_len: model_max.min(max_positions),
        })
    }

    /// The padded length every prompt is tokenized to (77 for SD).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Token ids without BOS/EOS, untruncated.
    pub fn content_ids(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::invalid("prompt", format!("cannot tokenize: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `[BOS] tokens [EOS] [PAD]...` of exactly `max_len()` ids, truncating long
    /// prompts. Also returns how many content tokens were dropped.
    pub fn encode(&self, text: &str) -> Result<(Vec<u32>, usize)> {
        let content = self.content_ids(text)?;
        let keep = content.len().min(self.max_len.saturating_sub(2));
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos);
        ids.extend_from_slice(&content[..keep]);
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        Ok((ids, content.len() - keep))
    }
}
