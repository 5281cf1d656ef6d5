//! The edit part of a request (image to image, inpainting): its pictures,
//! `strength` and the noise it may bring for them, checked once into the
//! [`InitImage`] the pipeline starts from.

use super::{GenerateParams, GivenLatents, InitImage, SourceImage, img2img_start};
use crate::diffusion::pipelines::ModelInfo;
use crate::diffusion::schedulers::SchedulerKind;
use crate::error::{Error, Result};

/// diffusers' `StableDiffusionImg2ImgPipeline` default `strength`.
pub const DEFAULT_STRENGTH: f64 = 0.8;

/// diffusers' `StableDiffusionXLImg2ImgPipeline` default `strength`.
pub const DEFAULT_XL_STRENGTH: f64 = 0.3;

/// diffusers' `StableDiffusionInpaintPipeline` default `strength`: the masked
/// area starts from pure noise.
pub const DEFAULT_INPAINT_STRENGTH: f64 = 1.0;

/// diffusers' `StableDiffusionXLInpaintPipeline` default `strength` (just
/// under 1, so the start mixes in the image and the first step is skipped).
pub const DEFAULT_XL_INPAINT_STRENGTH: f64 = 0.9999;

/// The pictures an edit request brings, each with the field it came in.
#[derive(Debug, Clone, Default)]
pub struct EditImages {
    /// The picture to start from (`init_image`, `image`, `--init-image`).
    pub init: Option<(SourceImage, String)>,
    /// Inpainting: white where the picture is repainted (`mask_image`, `--mask`).
    pub mask: Option<(SourceImage, String)>,
}

/// What the rest of the request settled that the edit is checked against.
pub(super) struct Settled<'a> {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub scheduler: SchedulerKind,
    pub num_images: usize,
    pub latents: Option<&'a GivenLatents>,
}

impl EditImages {
    /// The `(width, height)` an edit defaults to: its init image's size rounded
    /// down to multiples of `f` (`None` without an init image).
    pub(super) fn default_size(&self, f: usize) -> Result<Option<(usize, usize)>> {
        let Some((img, field)) = &self.init else {
            return Ok(None);
        };
        let (w, h) = img.default_size(f);
        if w == 0 || h == 0 {
            return Err(Error::invalid(
                field.clone(),
                format!(
                    "{}x{} is smaller than {f} pixels on a side",
                    img.width(),
                    img.height()
                ),
            ));
        }
        Ok(Some((w, h)))
    }

    /// Checks the edit fields and builds the picture (and mask) at the request's
    /// size; `None` for text to image. An inpainting model (9-channel UNet)
    /// needs both pictures: diffusers runs it only in its inpainting pipeline.
    pub(super) fn check(
        self,
        params: &GenerateParams,
        model: &ModelInfo,
        run: &Settled<'_>,
    ) -> Result<Option<InitImage>> {
        let Some((img, _)) = self.init else {
            if let Some((_, field)) = self.mask {
                return Err(Error::invalid(
                    field,
                    "needs the picture it masks (init_image)",
                ));
            }
            if model.inpainting {
                return Err(inpainting_model_needs_mask(model));
            }
            if model.refiner {
                return Err(Error::invalid(
                    "init_image",
                    format!(
                        "this model ({}) is an SDXL refiner, which only refines a picture: send \
                         the picture to refine (init_image), or use a base model for text to image",
                        model.name
                    ),
                ));
            }
            if params.strength.is_some() {
                return Err(Error::invalid(
                    "strength",
                    "needs an init image to change (init_image)",
                ));
            }
            check_noise(run, false, false)?;
            return Ok(None);
        };
        if model.inpainting && self.mask.is_none() {
            return Err(inpainting_model_needs_mask(model));
        }
        let default = default_strength(model, self.mask.is_some());
        let strength = check_strength(params.strength.unwrap_or(default), run, model)?;
        check_noise(run, true, self.mask.is_some())?;
        Ok(Some(InitImage {
            pixels: img.to_tensor(run.width, run.height)?,
            strength,
            mask: self
                .mask
                .map(|(mask, _)| mask.to_mask(run.width, run.height))
                .transpose()?,
        }))
    }
}

/// The `strength` an edit runs at when the request names none: the default of
/// the diffusers pipeline that edit is (image to image or inpainting, SD or SDXL).
pub fn default_strength(model: &ModelInfo, masked: bool) -> f64 {
    match (masked, model.family.is_xl()) {
        (false, false) => DEFAULT_STRENGTH,
        (false, true) => DEFAULT_XL_STRENGTH,
        (true, false) => DEFAULT_INPAINT_STRENGTH,
        (true, true) => DEFAULT_XL_INPAINT_STRENGTH,
    }
}

fn inpainting_model_needs_mask(model: &ModelInfo) -> Error {
    Error::invalid(
        "mask_image",
        format!(
            "this model ({}) is an inpainting model (its UNet takes the mask and masked picture): \
             send the picture (init_image) and a mask (mask_image), white where it repaints",
            model.name
        ),
    )
}

/// `strength` in (0, 1], leaving at least one of the steps to run (diffusers
/// refuses the same), on a scheduler whose image to image this is.
fn check_strength(strength: f64, run: &Settled<'_>, model: &ModelInfo) -> Result<f64> {
    if !strength.is_finite() || strength <= 0.0 || strength > 1.0 {
        return Err(Error::invalid(
            "strength",
            format!("{strength} is outside (0, 1]"),
        ));
    }
    let steps = run.steps;
    if img2img_start(steps, strength).is_none() {
        return Err(Error::invalid(
            "strength",
            format!(
                "{strength} of {steps} steps runs none (at least 1 / steps = {:.3} is needed)",
                1.0 / steps as f64
            ),
        ));
    }
    // LCM's image to image (diffusers' LatentConsistencyModelImg2ImgPipeline)
    // sets its timesteps from the strength itself: not this pipeline's.
    if model.scheduler_config.resolve(run.scheduler)? == SchedulerKind::Lcm {
        return Err(Error::invalid(
            "scheduler",
            "image to image with the LCM scheduler is not supported yet; choose another scheduler",
        ));
    }
    Ok(strength)
}

/// The posterior noise `--latents` may bring (`vae_noise` for the picture,
/// `masked_image_vae_noise` for the masked picture) fits the latents, `[1 or
/// num_images, c, h, w]`, and has a picture to go with.
fn check_noise(run: &Settled<'_>, has_init: bool, has_mask: bool) -> Result<()> {
    let Some(given) = run.latents else {
        return Ok(());
    };
    let want = &given.latents.dims()[1..];
    for (name, noise, needs, what) in [
        ("vae_noise", &given.vae_noise, has_init, "an init image"),
        (
            "masked_image_vae_noise",
            &given.masked_image_vae_noise,
            has_mask,
            "a mask",
        ),
    ] {
        let Some(noise) = noise else { continue };
        let dims = noise.dims();
        let fits = dims.len() == 4 && (dims[0] == 1 || dims[0] == run.num_images);
        if !needs || !fits || &dims[1..] != want {
            return Err(Error::invalid(
                "latents",
                format!(
                    "`{name}` {dims:?} needs {what} and the shape [1 or {}, {want:?}...]",
                    run.num_images
                ),
            ));
        }
    }
    Ok(())
}
