//! `sdserve generate`: one request from flags (or a PNG sdserve wrote), run
//! through the same validation and pipeline as the server, written as PNGs.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use clap::Args;

use super::ModelArgs;
use crate::error::{Error, Result};
use crate::output::{ImageMetadata, encode_png, read_png_metadata, to_rgb8};
use crate::request::{GenerateParams, GivenLatents, Inputs, Limits, SourceImage};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// What to draw.
    #[arg(long)]
    pub prompt: Option<String>,
    /// What to steer away from (classifier-free guidance).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    #[command(flatten)]
    pub xl: XlArgs,
    /// Denoising steps [default: the model's: 1 for Turbo folders, 4 for LCM, else 30].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Guidance scale; 1 or less disables classifier-free guidance (an LCM UNet
    /// takes it as an embedding instead) [default: the model's: 7.5 for SD
    /// 1.x/2.x, 5 for SDXL, 0 for Turbo folders, 8.5 for LCM UNets].
    #[arg(long)]
    pub guidance: Option<f64>,
    /// default, ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, pndm, lms, unipc, lcm.
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Override a scheduler config key, e.g. timestep_spacing=trailing (repeatable;
    /// values are JSON, or plain strings).
    #[arg(long = "scheduler-option", value_name = "KEY=VALUE")]
    pub scheduler_option: Vec<String>,
    /// Image width in pixels, a multiple of 8 [default: the model's size].
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels, a multiple of 8 [default: the model's size].
    #[arg(long)]
    pub height: Option<usize>,
    /// Seed of the first image; image i uses seed + i [default: random].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number of images.
    #[arg(long)]
    pub num_images: Option<usize>,
    /// A safetensors file whose `latents` tensor [n, 4, h/8, w/8] (f32) replaces
    /// the seeded initial noise, like diffusers' `latents=` argument. An optional
    /// `noise` tensor [steps, n, 4, h/8, w/8] replaces ancestral schedulers' noise.
    /// With --init-image, `latents` is the noise `add_noise` mixes in, and an
    /// optional `vae_noise` [1 or n, 4, h/8, w/8] the VAE posterior sample's draw;
    /// with --mask, `masked_image_vae_noise` is the masked picture's.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Image to image: a PNG, JPEG or WebP picture to start from; the output
    /// is its size rounded down to a multiple of 8 unless --width/--height say.
    #[arg(long, value_name = "FILE")]
    pub init_image: Option<PathBuf>,
    /// Image to image: how much to change --init-image, in (0, 1]: the share
    /// of the steps that run [default: 0.8 (SDXL 0.3); 1.0 with --mask (SDXL 0.9999)].
    #[arg(long)]
    pub strength: Option<f64>,
    /// Inpainting: a mask for --init-image (PNG, JPEG or WebP), white where the
    /// picture is repainted, black where it is kept (gray is cut at half);
    /// resized to the output size.
    #[arg(long, value_name = "FILE")]
    pub mask: Option<PathBuf>,
    /// Take every parameter from a PNG that sdserve wrote (flags given here win).
    #[arg(long)]
    pub from_image: Option<PathBuf>,
    /// Output PNG; with several images, NAME-0.png, NAME-1.png, ...
    #[arg(long, short, default_value = "out.png")]
    pub output: PathBuf,
    /// Largest width x height accepted.
    #[arg(long, env = "SDSERVE_MAX_PIXELS", default_value_t = Limits::default().max_pixels)]
    pub max_pixels: usize,
}

/// SDXL's second prompts and micro-conditioning (diffusers'
/// `StableDiffusionXLPipeline.__call__` arguments, and the refiner's aesthetic
/// scores); sizes are HEIGHT,WIDTH.
#[derive(Debug, Args)]
pub struct XlArgs {
    /// SDXL: the second text encoder's prompt [default: --prompt].
    #[arg(long = "prompt-2")]
    pub prompt_2: Option<String>,
    /// SDXL: the second text encoder's negative prompt [default: --negative-prompt].
    #[arg(long = "negative-prompt-2")]
    pub negative_prompt_2: Option<String>,
    /// SDXL: original size to condition on, HEIGHT,WIDTH [default: the image's].
    #[arg(long, value_name = "H,W", value_parser = parse_pair)]
    pub original_size: Option<[u32; 2]>,
    /// SDXL: crop corner to condition on, TOP,LEFT [default: 0,0].
    #[arg(long, value_name = "TOP,LEFT", value_parser = parse_pair)]
    pub crops_coords_top_left: Option<[u32; 2]>,
    /// SDXL: target size to condition on, HEIGHT,WIDTH [default: the image's].
    #[arg(long, value_name = "H,W", value_parser = parse_pair)]
    pub target_size: Option<[u32; 2]>,
    /// SDXL: --original-size of the unconditional pass (text to image: used with
    /// --negative-target-size; an edit defaults each to its positive one).
    #[arg(long, value_name = "H,W", value_parser = parse_pair)]
    pub negative_original_size: Option<[u32; 2]>,
    /// SDXL: --crops-coords-top-left of the unconditional pass.
    #[arg(long, value_name = "TOP,LEFT", value_parser = parse_pair)]
    pub negative_crops_coords_top_left: Option<[u32; 2]>,
    /// SDXL: --target-size of the unconditional pass (text to image: used with
    /// --negative-original-size).
    #[arg(long, value_name = "H,W", value_parser = parse_pair)]
    pub negative_target_size: Option<[u32; 2]>,
    /// SDXL refiner: the aesthetic score to condition on, 0 to 10 [default: 6].
    #[arg(long, value_name = "SCORE")]
    pub aesthetic_score: Option<f64>,
    /// SDXL refiner: the unconditional pass's aesthetic score [default: 2.5].
    #[arg(long, value_name = "SCORE")]
    pub negative_aesthetic_score: Option<f64>,
}

impl XlArgs {
    /// Puts the flags given over what `params` holds.
    fn apply(&self, params: &mut GenerateParams) {
        let m = &mut params.micro;
        let given = [
            (&mut m.original_size, self.original_size),
            (&mut m.crops_coords_top_left, self.crops_coords_top_left),
            (&mut m.target_size, self.target_size),
            (&mut m.negative_original_size, self.negative_original_size),
            (
                &mut m.negative_crops_coords_top_left,
                self.negative_crops_coords_top_left,
            ),
            (&mut m.negative_target_size, self.negative_target_size),
        ];
        for (slot, flag) in given {
            if flag.is_some() {
                *slot = flag;
            }
        }
        let scores = [
            (&mut m.aesthetic_score, self.aesthetic_score),
            (
                &mut m.negative_aesthetic_score,
                self.negative_aesthetic_score,
            ),
        ];
        for (slot, flag) in scores {
            if flag.is_some() {
                *slot = flag;
            }
        }
        if self.prompt_2.is_some() {
            params.prompt_2 = self.prompt_2.clone();
        }
        if self.negative_prompt_2.is_some() {
            params.negative_prompt_2 = self.negative_prompt_2.clone();
        }
    }
}

/// `"1024,768"` (also `x`) as a pair of non-negative integers.
fn parse_pair(s: &str) -> std::result::Result<[u32; 2], String> {
    let (a, b) = s
        .split_once([',', 'x', 'X'])
        .ok_or_else(|| format!("{s:?} is not two integers A,B"))?;
    let int = |v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|_| format!("{v:?} is not a non-negative integer"))
    };
    Ok([int(a)?, int(b)?])
}

fn load_latents(path: &Path) -> Result<GivenLatents> {
    if !path.is_file() {
        return Err(Error::invalid(
            "latents",
            format!("{}: no such file", path.display()),
        ));
    }
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        Error::invalid(
            "latents",
            format!("{}: not a safetensors file: {e}", path.display()),
        )
    })?;
    let t = tensors.get("latents").ok_or_else(|| {
        Error::invalid(
            "latents",
            format!("{}: has no tensor named `latents`", path.display()),
        )
    })?;
    let step_noise = tensors
        .get("noise")
        .map(|n| n.to_dtype(DType::F32))
        .transpose()?;
    let optional = |name: &str| {
        tensors
            .get(name)
            .map(|n| n.to_dtype(DType::F32))
            .transpose()
    };
    Ok(GivenLatents {
        latents: t.to_dtype(DType::F32)?,
        step_noise,
        vae_noise: optional("vae_noise")?,
        masked_image_vae_noise: optional("masked_image_vae_noise")?,
    })
}

/// Output path of image `i` of `n`.
pub fn output_path(base: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return base.to_path_buf();
    }
    let stem = base
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let ext = base
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    base.with_file_name(format!("{stem}-{i}.{ext}"))
}

pub fn run_generate(args: &GenerateArgs) -> Result<Vec<PathBuf>> {
    let mut params = match &args.from_image {
        Some(p) => {
            let m = read_png_metadata(p)?;
            GenerateParams {
                prompt: Some(m.prompt),
                negative_prompt: m.negative_prompt,
                prompt_2: m.prompt_2,
                negative_prompt_2: m.negative_prompt_2,
                micro: m.micro,
                width: Some(m.width),
                height: Some(m.height),
                steps: Some(m.steps),
                guidance: Some(m.guidance),
                scheduler: Some(m.scheduler),
                scheduler_options: Some(m.scheduler_options),
                seed: Some(m.seed),
                num_images: None,
                strength: m.strength,
            }
        }
        None => GenerateParams::default(),
    };
    macro_rules! take {
        ($($f:ident),*) => { $( if args.$f.is_some() { params.$f = args.$f.clone(); } )* };
    }
    take!(
        prompt,
        negative_prompt,
        width,
        height,
        steps,
        guidance,
        scheduler,
        seed,
        num_images,
        strength
    );
    args.xl.apply(&mut params);
    if !args.scheduler_option.is_empty() {
        let options = params
            .scheduler_options
            .get_or_insert_with(Default::default);
        for kv in &args.scheduler_option {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                Error::invalid("scheduler_option", format!("{kv:?} is not KEY=VALUE"))
            })?;
            let value = serde_json::from_str(v)
                .unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
            options.insert(k.trim().to_string(), value);
        }
        // `solver_order=2.0` is the integer 2, as over HTTP.
        crate::fields::integral_numbers(options);
    }
    if params.prompt.is_none() {
        return Err(Error::invalid("prompt", "required (or give --from-image)"));
    }
    let latents = args.latents.as_deref().map(load_latents).transpose()?;
    let read_image = |path: &Option<PathBuf>, field: &str| {
        path.as_deref()
            .map(|p| {
                let img = SourceImage::read(p, field, args.max_pixels)?;
                Ok::<_, Error>((img, field.to_string()))
            })
            .transpose()
    };
    let init_image = read_image(&args.init_image, "init_image")?;
    let mask_image = read_image(&args.mask, "mask_image")?;
    // No per-side cap on the command line beyond the area: the caller is the
    // operator, and sizes are checked (and memory bounded) all the same.
    let limits = Limits {
        max_pixels: args.max_pixels,
        max_side: args.max_pixels,
        ..Limits::default()
    };
    if let Some(dir) = args
        .output
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.is_dir())
    {
        return Err(Error::invalid(
            "output",
            format!("{}: no such directory", dir.display()),
        ));
    }

    let model = args.model.load()?;
    let inputs = Inputs {
        latents,
        init_image,
        mask_image,
    };
    let req = params.validate_with(model.info(), &limits, inputs)?;
    let scheduler = model.scheduler_config().resolve(req.scheduler)?;
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} steps, {elapsed} elapsed, ETA {eta}",
        )
        .expect("valid template"),
    );
    bar.set_message(format!("{} x{}", scheduler, req.num_images));
    let out = model.generate(&req, &mut |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64);
        true
    })?;
    bar.finish_and_clear();

    let images = to_rgb8(&out.images)?;
    let n = images.len();
    let mut written = Vec::with_capacity(n);
    for (i, (img, seed)) in images.iter().zip(&out.seeds).enumerate() {
        let meta = ImageMetadata::new(&req, scheduler, *seed, &model.info().source);
        let path = output_path(&args.output, i, n);
        let png = encode_png(img, Some(&meta))?;
        std::fs::write(&path, png).map_err(|e| Error::io(&path, e))?;
        written.push(path);
    }
    tracing::info!(
        text_encoder_s = out.timings.text_encoder,
        denoise_s = out.timings.denoise,
        vae_encode_s = out.timings.vae_encode,
        vae_decode_s = out.timings.vae_decode,
        "generated {n} image(s)"
    );
    Ok(written)
}
