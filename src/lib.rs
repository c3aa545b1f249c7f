//! `tkg`: chroma-key image generation with Stable Diffusion (TKG-DM) and a keyer.
//!
//! Data flows one way:
//! prompt → [`models::tokenizer`] → [`models::clip`] → conditioning → [`tkg`] initial noise →
//! [`pipeline`] denoise loop ([`models::unet`] + CFG + [`scheduler`]) → [`models::vae`] decode →
//! [`key`] → [`output`] writers.

pub mod bench;
pub mod cli;
pub mod color;
pub mod jobs;
pub mod kernels;
pub mod key;
pub mod metadata;
pub mod models;
pub mod output;
pub mod pipeline;
pub mod rng;
pub mod scheduler;
pub mod tkg;
