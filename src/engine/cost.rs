//! Time estimates from measured step times: how long a job will take, and how
//! long until a queued job is done.
//!
//! One UNet step costs roughly in proportion to the rows it runs (images, times 2
//! under classifier-free guidance) times the pixels; text encoding and VAE decode
//! roughly in proportion to the images' pixels. The worker measures both rates on
//! every job (and on its warm-up generation) and keeps moving averages.

use crate::request::GenerateRequest;

/// What the estimate needs to know about a job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobShape {
    pub steps: usize,
    pub num_images: usize,
    pub megapixels: f64,
    pub guided: bool,
}

impl JobShape {
    pub fn of(req: &GenerateRequest) -> Self {
        Self {
            steps: req.steps,
            num_images: req.num_images,
            megapixels: (req.width * req.height) as f64 / 1e6,
            guided: req.guided,
        }
    }

    /// UNet rows × megapixels: the work of one denoising step.
    fn step_units(&self) -> f64 {
        let rows = self.num_images * if self.guided { 2 } else { 1 };
        rows as f64 * self.megapixels
    }

    /// Image megapixels: the work of text encoding plus VAE decode.
    fn image_units(&self) -> f64 {
        self.num_images as f64 * self.megapixels
    }
}

/// Measured rates (moving averages).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostModel {
    /// Seconds per step per step unit.
    pub step_rate: f64,
    /// Seconds of fixed work (text encoder, VAE decode) per image megapixel.
    pub image_rate: f64,
}

/// Weight of the newest measurement in the moving averages.
const NEW_WEIGHT: f64 = 0.3;

impl CostModel {
    /// Rates assumed until a job or the warm-up has been measured: the order
    /// of magnitude of a full-size SD 1.5 on two CPU cores (a guided 512-px
    /// step, 0.52 step units, in about 6 s). Only the first estimates use it.
    pub const PRIOR: CostModel = CostModel {
        step_rate: 12.0,
        image_rate: 40.0,
    };

    /// The rates one finished job implies: it ran `steps_run` steps in
    /// `denoise_s`, and spent `other_s` encoding the prompt and decoding.
    pub fn measured(shape: &JobShape, steps_run: usize, denoise_s: f64, other_s: f64) -> Self {
        let steps = steps_run.max(1) as f64;
        Self {
            step_rate: denoise_s / (steps * shape.step_units()).max(1e-9),
            image_rate: other_s / shape.image_units().max(1e-9),
        }
    }

    /// Folds a new measurement into `previous`.
    pub fn update(previous: Option<Self>, new: Self) -> Self {
        match previous {
            None => new,
            Some(p) => Self {
                step_rate: (1.0 - NEW_WEIGHT) * p.step_rate + NEW_WEIGHT * new.step_rate,
                image_rate: (1.0 - NEW_WEIGHT) * p.image_rate + NEW_WEIGHT * new.image_rate,
            },
        }
    }

    /// Seconds a job of this shape takes when `steps_done` of its steps are done.
    pub fn remaining(&self, shape: &JobShape, steps_done: usize) -> f64 {
        let steps_left = shape.steps.saturating_sub(steps_done) as f64;
        steps_left * shape.step_units() * self.step_rate + shape.image_units() * self.image_rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(num_images: usize, guided: bool) -> JobShape {
        JobShape {
            steps: 10,
            num_images,
            megapixels: 0.25,
            guided,
        }
    }

    #[test]
    fn a_measurement_predicts_the_job_it_came_from() {
        let s = shape(2, true);
        let m = CostModel::measured(&s, 10, 4.0, 1.0);
        assert!((m.remaining(&s, 0) - 5.0).abs() < 1e-9);
        assert!((m.remaining(&s, 5) - 3.0).abs() < 1e-9);
        // Half the rows without guidance: half the denoising time.
        let unguided = shape(2, false);
        assert!((m.remaining(&unguided, 0) - 3.0).abs() < 1e-9);
    }

    #[test]
    fn update_moves_toward_new_measurements() {
        let a = CostModel {
            step_rate: 1.0,
            image_rate: 1.0,
        };
        let b = CostModel {
            step_rate: 2.0,
            image_rate: 3.0,
        };
        assert_eq!(CostModel::update(None, b), b);
        let c = CostModel::update(Some(a), b);
        assert!(c.step_rate > 1.0 && c.step_rate < 2.0);
        assert!(c.image_rate > 1.0 && c.image_rate < 3.0);
    }
}
