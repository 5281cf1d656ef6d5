//! Input images of edit requests (image to image, inpainting): bytes to
//! pixels, checked once, and pixels to the tensors the pipeline takes (the
//! picture the VAE encodes, the binary mask).
//!
//! Reading follows what diffusers users feed its pipelines,
//! `diffusers.utils.load_image`: the EXIF orientation is applied
//! (`PIL.ImageOps.exif_transpose`), then `convert("RGB")`, which drops an alpha
//! channel without compositing (the colour under a transparent pixel is kept).
//! PNG, JPEG and WebP are read. Errors name the request field the image came in.
//!
//! A mask is an image like any other, read as diffusers' `mask_processor`
//! (`VaeImageProcessor(do_normalize=False, do_binarize=True,
//! do_convert_grayscale=True)`) reads it: white repaints, black keeps, gray is
//! cut at half. Its alpha channel is dropped like the picture's; neither
//! picture's alpha is taken as a mask.

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

    /// The picture at `width` x `height`: itself when the size matches, else
    /// resized with a Lanczos-3 filter (diffusers' default `resample="lanczos"`,
    /// PIL's `LANCZOS`; the two filters' rounding differs, so a resized input is
    /// close to diffusers' but not bit for bit).
    fn at_size(&self, width: usize, height: usize) -> std::borrow::Cow<'_, RgbImage> {
        if (self.width(), self.height()) == (width, height) {
            return std::borrow::Cow::Borrowed(&self.rgb);
        }
        std::borrow::Cow::Owned(image::imageops::resize(
            &self.rgb,
            width as u32,
            height as u32,
            FilterType::Lanczos3,
        ))
    }

    /// `[1, 3, height, width]` f32 in [-1, 1]: `VaeImageProcessor.preprocess`
    /// (resize, `/ 255`, `2x - 1`).
    pub fn to_tensor(&self, width: usize, height: usize) -> Result<Tensor> {
        let rgb = self.at_size(width, height);
        let (w, h) = (width, height);
        let mut data = vec![0f32; 3 * w * h];
        for (i, px) in rgb.pixels().enumerate() {
            for c in 0..3 {
                data[c * w * h + i] = px[c] as f32 / 255.0 * 2.0 - 1.0;
            }
        }
        Ok(Tensor::from_vec(data, (1, 3, h, w), &Device::Cpu)?)
    }

    /// This image as an inpainting mask, `[1, 1, height, width]` f32 of 0 and 1:
    /// the `mask_processor.preprocess` of diffusers' inpainting pipelines —
    /// resize (as [`Self::to_tensor`]), `convert("L")` (PIL's integer ITU-R
    /// 601-2 luma), `/ 255`, then `binarize`: 1 where the gray is at least 0.5
    /// (128 and up), 0 below.
    pub fn to_mask(&self, width: usize, height: usize) -> Result<Tensor> {
        let rgb = self.at_size(width, height);
        let data: Vec<f32> = rgb
            .pixels()
            .map(|px| {
                let gray = pil_luma(px.0);
                if gray as f32 / 255.0 >= 0.5 { 1.0 } else { 0.0 }
            })
            .collect();
        Ok(Tensor::from_vec(data, (1, 1, height, width), &Device::Cpu)?)
    }
}

/// PIL's `convert("L")` of one RGB pixel: `L = R·299/1000 + G·587/1000 +
/// B·114/1000` in 16-bit fixed point, rounded (Pillow's `rgb2l`).
fn pil_luma([r, g, b]: [u8; 3]) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
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
    fn masks_are_pil_gray_cut_at_half() {
        // PIL's convert("L") of these pixels: 128, 127, 76 (pure red), 150 (pure green)
        assert_eq!(pil_luma([128, 128, 128]), 128);
        assert_eq!(pil_luma([127, 127, 127]), 127);
        assert_eq!(pil_luma([255, 0, 0]), 76);
        assert_eq!(pil_luma([0, 255, 0]), 150);
        assert_eq!(pil_luma([255, 255, 255]), 255);
        let px = [[128, 128, 128], [127, 127, 127], [255, 0, 0], [0, 255, 0]];
        let img = RgbImage::from_fn(4, 1, |x, _| image::Rgb(px[x as usize]));
        let mask = SourceImage { rgb: img }.to_mask(4, 1).unwrap();
        assert_eq!(mask.dims(), [1, 1, 1, 4]);
        let v = mask.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v, [1.0, 0.0, 0.0, 1.0]);
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
