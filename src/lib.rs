//! `tkg`: chroma-key image generation with Stable Diffusion (TKG-DM) and a keyer.
//!
//! Data flows one way:
//! prompt → [`models::tokenizer`] → [`models::clip`] → conditioning → [`tkg`] initial noise →
//! [`pipeline`] denoise loop ([`models::unet`] + CFG + [`scheduler`]) → [`models::vae`] decode →
//! [`key`] → [`output`] writers.
//!
//! [`run`] plans and runs jobs over that pipeline: [`settings::Settings`] per image (changed
//! by [`settings::SettingsPatch`]es from flags or job lines), [`run::RunConfig`] per run, and
//! [`run::Events`] to hear progress. [`metadata`] writes and reads what an image records.
//! The library prints nothing and reads no environment variables but the Hugging Face ones
//! ([`models::hub`]).

pub mod bench;
pub mod color;
pub mod family;
pub mod kernels;
pub mod key;
pub mod limits;
pub mod metadata;
pub mod models;
pub mod onnx;
pub mod output;
pub mod photo;
pub mod pipeline;
pub mod place;
pub mod resize;
pub mod rng;
pub mod run;
pub mod sampling;
pub mod scheduler;
pub mod segment;
pub mod settings;
pub mod text;
pub mod tkg;
