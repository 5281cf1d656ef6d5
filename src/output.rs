//! From decoded tensors to image files.
//!
//! Quantisation matches diffusers' `VaeImageProcessor.numpy_to_pil`
//! (`(images * 255).round().astype("uint8")`). PNGs carry their generation
//! parameters twice: a `parameters` text chunk in the format AUTOMATIC1111's
//! web UI writes and other SD tools read, and an `sdserve` chunk with the same
//! as JSON, which `sdserve generate --from-image` reads back to reproduce it.

use std::io::{BufReader, Cursor};
use std::path::Path;

use candle_core::{DType, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::diffusion::params::{GenerateRequest, MicroConditioning};
use crate::diffusion::schedulers::SchedulerKind;
use crate::error::{Error, Result};

/// What made the images, as their metadata names it.
pub const GENERATOR: &str = concat!("sdserve ", env!("CARGO_PKG_VERSION"));

/// The PNG chunk keyword holding sdserve's JSON metadata.
pub const JSON_KEYWORD: &str = "sdserve";
/// The PNG chunk keyword other Stable Diffusion tools read.
pub const PARAMETERS_KEYWORD: &str = "parameters";

/// Everything needed to regenerate an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageMetadata {
    pub prompt: String,
    /// `null` when none was given (SDXL then conditions on zeros, not on `""`).
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// SDXL's second prompts, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_2: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt_2: Option<String>,
    /// SDXL's micro-conditioning, the fields given.
    #[serde(default, flatten)]
    pub micro: MicroConditioning,
    pub steps: usize,
    pub guidance: f64,
    /// The scheduler actually run (never `default`).
    pub scheduler: String,
    /// Scheduler config overrides the image was made with.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub scheduler_options: serde_json::Map<String, serde_json::Value>,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    /// Image to image: the strength it ran with (its source is not stored in
    /// the PNG: `--from-image` needs `--init-image` to redo an edit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// Inpainting: the edit was masked (the mask is not stored either:
    /// `--from-image` needs `--init-image` and `--mask` to redo it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub masked: bool,
    pub model: String,
    pub generator: String,
}

impl ImageMetadata {
    /// The metadata of the image made with `seed` by `request`, run with
    /// `scheduler` (the model's default resolved) on the model called `model`.
    pub fn new(
        request: &GenerateRequest,
        scheduler: SchedulerKind,
        seed: u64,
        model: &str,
    ) -> Self {
        Self {
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone(),
            prompt_2: request.prompt_2.clone(),
            negative_prompt_2: request.negative_prompt_2.clone(),
            micro: request.micro,
            steps: request.steps,
            guidance: request.guidance,
            scheduler: scheduler.name().to_string(),
            scheduler_options: request.scheduler_options.clone(),
            seed,
            width: request.width,
            height: request.height,
            strength: request.init.as_ref().map(|i| i.strength),
            masked: request.init.as_ref().is_some_and(|i| i.mask.is_some()),
            model: model.to_string(),
            generator: GENERATOR.to_string(),
        }
    }

    /// The AUTOMATIC1111 "parameters" text.
    pub fn a1111_parameters(&self) -> String {
        let sampler = match SchedulerKind::parse(&self.scheduler) {
            Some(SchedulerKind::Ddim) => "DDIM",
            Some(SchedulerKind::Euler) => "Euler",
            Some(SchedulerKind::EulerAncestral) => "Euler a",
            Some(SchedulerKind::DpmPp2M) => "DPM++ 2M",
            Some(SchedulerKind::DpmPp2MKarras) => "DPM++ 2M Karras",
            Some(SchedulerKind::Pndm) => "PLMS",
            _ => self.scheduler.as_str(),
        };
        let mut s = self.prompt.clone();
        if let Some(negative) = self.negative_prompt.as_deref().filter(|n| !n.is_empty()) {
            s.push_str("\nNegative prompt: ");
            s.push_str(negative);
        }
        s.push_str(&format!(
            "\nSteps: {}, Sampler: {sampler}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}, Version: {}",
            self.steps, self.guidance, self.seed, self.width, self.height, self.model, self.generator
        ));
        if let Some(strength) = self.strength {
            // What the web UI writes for its img2img results.
            s.push_str(&format!(", Denoising strength: {strength}"));
        }
        s
    }
}

/// `[n, 3, H, W]` floats in [0, 1] → 8-bit RGB images.
pub fn to_rgb8(images: &Tensor) -> Result<Vec<RgbImage>> {
    let (n, c, h, w) = images.dims4()?;
    if c != 3 {
        return Err(candle_core::Error::Msg(format!("expected 3 channels, got {c}")).into());
    }
    let values = images
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    // numpy's round() is round-half-to-even.
    let bytes: Vec<u8> = values
        .iter()
        .map(|&v| (v * 255.0).round_ties_even().clamp(0.0, 255.0) as u8)
        .collect();
    Ok(bytes
        .chunks_exact(h * w * 3)
        .take(n)
        .map(|px| {
            RgbImage::from_raw(w as u32, h as u32, px.to_vec()).expect("buffer sized from dims")
        })
        .collect())
}

/// Encodes a PNG with the metadata chunks.
pub fn encode_png(img: &RgbImage, meta: Option<&ImageMetadata>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, img.width(), img.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let err =
            |e: png::EncodingError| candle_core::Error::Msg(format!("PNG encoding failed: {e}"));
        if let Some(meta) = meta {
            let params = meta.a1111_parameters();
            // Like PIL's `PngInfo.add_text`: tEXt when Latin-1 can hold it, iTXt otherwise.
            if params.chars().all(|c| (c as u32) < 256) {
                enc.add_text_chunk(PARAMETERS_KEYWORD.into(), params)
                    .map_err(err)?;
            } else {
                enc.add_itxt_chunk(PARAMETERS_KEYWORD.into(), params)
                    .map_err(err)?;
            }
            let json = serde_json::to_string(meta).expect("metadata serialises");
            enc.add_itxt_chunk(JSON_KEYWORD.into(), json).map_err(err)?;
        }
        let mut writer = enc.write_header().map_err(err)?;
        writer.write_image_data(img.as_raw()).map_err(err)?;
        writer.finish().map_err(err)?;
    }
    Ok(out)
}

/// Reads sdserve's metadata back from a PNG written by [`encode_png`].
pub fn read_png_metadata(path: &Path) -> Result<ImageMetadata> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let decoder = png::Decoder::new(BufReader::new(Cursor::new(bytes)));
    let reader = decoder
        .read_info()
        .map_err(|e| Error::invalid("from_image", format!("{}: not a PNG: {e}", path.display())))?;
    let info = reader.info();
    let chunk = info
        .utf8_text
        .iter()
        .find(|c| c.keyword == JSON_KEYWORD)
        .ok_or_else(|| {
            Error::invalid(
                "from_image",
                format!("{}: has no `{JSON_KEYWORD}` metadata chunk", path.display()),
            )
        })?;
    let text = chunk.get_text().map_err(|e| {
        Error::invalid(
            "from_image",
            format!("{}: unreadable metadata: {e}", path.display()),
        )
    })?;
    serde_json::from_str(&text).map_err(|e| {
        Error::invalid(
            "from_image",
            format!("{}: invalid metadata JSON: {e}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(prompt: &str) -> ImageMetadata {
        ImageMetadata {
            prompt: prompt.into(),
            negative_prompt: Some("blurry".into()),
            prompt_2: None,
            negative_prompt_2: None,
            micro: Default::default(),
            steps: 20,
            guidance: 7.5,
            scheduler: "euler_a".into(),
            scheduler_options: Default::default(),
            seed: 42,
            width: 64,
            height: 64,
            strength: None,
            masked: false,
            model: "tiny".into(),
            generator: "sdserve test".into(),
        }
    }

    #[test]
    fn quantises_like_diffusers() {
        let t = Tensor::from_vec(
            vec![0.0f32, 0.5, 1.0, 0.001, 0.998, 0.2],
            (1, 3, 1, 2),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let img = &to_rgb8(&t).unwrap()[0];
        // channel-first [r0 r1][g0 g1][b0 b1] -> pixel 0 = (0, 1.0, 0.998), pixel 1 = (0.5, 0.001, 0.2);
        // 0.5 * 255 = 127.5 rounds half to even like numpy.
        assert_eq!(img.get_pixel(0, 0).0, [0, 255, 254]);
        assert_eq!(img.get_pixel(1, 0).0, [128, 0, 51]);
    }

    #[test]
    fn png_metadata_round_trips_including_non_latin1() {
        for prompt in ["a cat", "東京の猫 🐱"] {
            let img = RgbImage::from_pixel(4, 2, image::Rgb([1, 2, 3]));
            let png = encode_png(&img, Some(&meta(prompt))).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("x.png");
            std::fs::write(&p, &png).unwrap();
            assert_eq!(read_png_metadata(&p).unwrap(), meta(prompt));
            let decoded = image::load_from_memory(&png).unwrap().to_rgb8();
            assert_eq!(decoded, img);
        }
    }

    #[test]
    fn sdxl_fields_round_trip_and_an_absent_negative_stays_absent() {
        let mut m = meta("a cat");
        m.negative_prompt = None;
        m.prompt_2 = Some("oil painting".into());
        m.micro.original_size = Some([512, 768]);
        m.micro.crops_coords_top_left = Some([0, 16]);
        m.micro.aesthetic_score = Some(7.5);
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["aesthetic_score"], serde_json::json!(7.5));
        assert_eq!(json["negative_prompt"], serde_json::Value::Null);
        assert_eq!(json["original_size"], serde_json::json!([512, 768]));
        assert!(json.get("target_size").is_none());
        assert_eq!(serde_json::from_value::<ImageMetadata>(json).unwrap(), m);
        // Metadata written before these fields existed still reads.
        let mut old = serde_json::to_value(meta("a cat")).unwrap();
        old["negative_prompt"] = "".into();
        let old: ImageMetadata = serde_json::from_value(old).unwrap();
        assert_eq!(old.negative_prompt.as_deref(), Some(""));
        assert!(old.micro.is_empty());
    }

    #[test]
    fn a1111_format() {
        let s = meta("a cat").a1111_parameters();
        assert_eq!(
            s,
            "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: tiny, Version: sdserve test"
        );
    }
}
