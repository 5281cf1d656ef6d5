//! diffusers' `AutoencoderKL`, the part text-to-image needs: the decoder
//! (latents to pixels). The encoder, for image-to-image, belongs beside it,
//! built from the same layers.

mod decoder;

pub use decoder::VaeDecoder;
