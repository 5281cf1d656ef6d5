//! Input images of edit requests (image to image): bytes to pixels, checked
//! once, and pixels to the tensor the VAE encoder takes.
//!
//! Reading follows what diffusers users feed its pipelines,
//! `diffusers.utils.load_image`: the EXIF orientation is applied
//! (`PIL.ImageOps.exif_transpose`), then `convert("RGB")`, which drops an alpha
//! channel without compositing (the colour under a transparent pixel is kept).
//! PNG, JPEG and WebP are read. Errors name the request field the image came in.

use std::io::Cursor;

use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage, imageops::FilterType};

use crate::error::{Error, Result};

/// Largest encoded input image accepted, in bytes.
pub const MAX_IMAGE_BYTES: usize = 32 << 20;

/// A decoded RGB input image.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceImage {
    pub rgb: RgbImage,
}

impl SourceImage {
    /// Decodes PNG, JPEG or WebP `bytes`; `field` names the image in errors, and
    /// images over `max_pixels` (width × height) are refused before decoding.
    pub fn decode(bytes: &[u8], field: &str, max_pixels: usize) -> Result<Self> {
        if bytes.is_empty() {
            return Err(Error::invalid(field, "is empty"));
        }
        if bytes.len() > MAX_IMAGE_BYTES {
            return Err(Error::invalid(
                field,
                format!(
                    "{} bytes is over the limit of {MAX_IMAGE_BYTES}",
                    bytes.len()
                ),
            ));
        }
        let bad =
            |e: image::ImageError| Error::invalid(field, format!("not a readable image: {e}"));
        let reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| Error::invalid(field, format!("not a readable image: {e}")))?;
        if reader.format().is_none() {
            return Err(Error::invalid(
                field,
                "not a PNG, JPEG or WebP image (unknown format)",
            ));
        }
        let mut decoder = reader.into_decoder().map_err(bad)?;
        let (w, h) = decoder.dimensions();
        let pixels = (w as usize).saturating_mul(h as usize);
        if pixels > max_pixels {
            return Err(Error::invalid(
                field,
                format!("{w}x{h} is {pixels} pixels, over the limit of {max_pixels}"),
            ));
        }
        let orientation = decoder.orientation().map_err(bad)?;
        let mut img = DynamicImage::from_decoder(decoder).map_err(bad)?;
        img.apply_orientation(orientation);
        Ok(Self { rgb: img.to_rgb8() })
    }

    /// Decodes an image sent as text: base64 (standard alphabet, padding
    /// optional, whitespace ignored) or a `data:image/...;base64,` URL.
    pub fn from_base64(text: &str, field: &str, max_pixels: usize) -> Result<Self> {
        use base64::Engine as _;
        let payload = match text.trim_start().strip_prefix("data:") {
            Some(rest) => {
                let (meta, data) = rest.split_once(',').ok_or_else(|| {
                    Error::invalid(field, "a data: URL needs a comma before its data")
                })?;
                if !meta.ends_with(";base64") {
                    return Err(Error::invalid(
                        field,
                        "a data: URL must be base64 (;base64,)",
                    ));
                }
                data
            }
            None => text,
        };
        let compact: String = payload
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        let engine = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        if compact.len() / 4 * 3 > MAX_IMAGE_BYTES {
            return Err(Error::invalid(
                field,
                format!("over the limit of {MAX_IMAGE_BYTES} bytes"),
            ));
        }
        let bytes = engine
            .decode(compact.as_bytes())
            .map_err(|e| Error::invalid(field, format!("not base64: {e}")))?;
        Self::decode(&bytes, field, max_pixels)
    }

    /// Reads an image file (the CLI's `--init-image`); errors name `flag` and the path.
    pub fn read(path: &std::path::Path, flag: &str, max_pixels: usize) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::invalid(flag, format!("{}: {e}", path.display())))?;
        Self::decode(&bytes, flag, max_pixels).map_err(|e| match e {
            Error::InvalidRequest { field, message } => {
                Error::invalid(field, format!("{}: {message}", path.display()))
            }
            other => other,
        })
    }

    pub fn width(&self) -> usize {
        self.rgb.width() as usize
    }

    pub fn height(&self) -> usize {
        self.rgb.height() as usize
    }

    /// The image's size rounded down to multiples of `f`, as diffusers'
    /// `VaeImageProcessor.get_default_height_width` picks the output size when
    /// a pipeline is given no height or width: `(width, height)`.
    pub fn default_size(&self, f: usize) -> (usize, usize) {
        (self.width() / f * f, self.height() / f * f)
    }

    /// `[1, 3, height, width]` f32 in [-1, 1]: `VaeImageProcessor.preprocess`
    /// (resize, `/ 255`, `2x - 1`). The resize runs only when the size differs,
    /// with a Lanczos-3 filter (diffusers' default `resample="lanczos"`, PIL's
    /// `LANCZOS`; the two filters' rounding differs, so a resized input is close
    /// to diffusers' but not bit for bit).
    pub fn to_tensor(&self, width: usize, height: usize) -> Result<Tensor> {
        let resized;
        let rgb = if (self.width(), self.height()) == (width, height) {
            &self.rgb
        } else {
            resized = image::imageops::resize(
                &self.rgb,
                width as u32,
                height as u32,
                FilterType::Lanczos3,
            );
            &resized
        };
        let (w, h) = (width, height);
        let mut data = vec![0f32; 3 * w * h];
        for (i, px) in rgb.pixels().enumerate() {
            for c in 0..3 {
                data[c * w * h + i] = px[c] as f32 / 255.0 * 2.0 - 1.0;
            }
        }
        Ok(Tensor::from_vec(data, (1, 3, h, w), &Device::Cpu)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn decodes_and_normalises_to_minus_one_one() {
        let img = SourceImage::decode(&png(16, 8), "init_image", 1 << 20).unwrap();
        assert_eq!((img.width(), img.height()), (16, 8));
        let t = img.to_tensor(16, 8).unwrap();
        assert_eq!(t.dims(), [1, 3, 8, 16]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // channel 0 at (x = 3, y = 0) is 3 / 255 * 2 - 1
        assert!((v[3] - (3.0 / 255.0 * 2.0 - 1.0)).abs() < 1e-6);
        // channel 2 is 7 everywhere
        assert!((v[2 * 128] - (7.0 / 255.0 * 2.0 - 1.0)).abs() < 1e-6);
        assert_eq!(img.default_size(8), (16, 8));
        assert_eq!(
            SourceImage::decode(&png(20, 9), "x", 1 << 20)
                .unwrap()
                .default_size(8),
            (16, 8)
        );
        assert_eq!(img.to_tensor(32, 16).unwrap().dims(), [1, 3, 16, 32]);
    }

    #[test]
    fn base64_and_data_urls_decode_alike() {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(png(8, 4));
        let plain = SourceImage::from_base64(&b64, "image", 1 << 20).unwrap();
        let url = format!("data:image/png;base64,{b64}");
        assert_eq!(
            SourceImage::from_base64(&url, "image", 1 << 20).unwrap(),
            plain
        );
        let unpadded = b64.trim_end_matches('=');
        assert_eq!(
            SourceImage::from_base64(unpadded, "image", 1 << 20).unwrap(),
            plain
        );
        for (text, want) in [
            ("%%%", "not base64"),
            ("data:image/png,abc", "must be base64"),
            ("data:image/png;base64", "comma"),
        ] {
            let err = SourceImage::from_base64(text, "image", 1 << 20).unwrap_err();
            assert!(err.to_string().contains(want), "{err}");
        }
    }

    #[test]
    fn bad_images_name_the_field() {
        for (bytes, want) in [
            (Vec::new(), "is empty"),
            (b"not an image at all".to_vec(), "unknown format"),
            (png(8, 8)[..40].to_vec(), "not a readable image"),
        ] {
            match SourceImage::decode(&bytes, "mask_image", 1 << 20) {
                Err(Error::InvalidRequest { field, message }) => {
                    assert_eq!(field, "mask_image");
                    assert!(message.contains(want), "{message}");
                }
                other => panic!("{other:?}"),
            }
        }
        match SourceImage::decode(&png(64, 64), "init_image", 1000) {
            Err(Error::InvalidRequest { field, message }) => {
                assert_eq!(field, "init_image");
                assert!(message.contains("over the limit"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}
