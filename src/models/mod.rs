//! Model files and networks: registry and Hub cache, configs, tokenizer, text encoder, UNet,
//! VAE, weight loading and the built-in random-weight models.

pub mod blocks;
pub mod builtin;
pub mod clip;
pub mod config;
pub mod hash;
pub mod hub;
pub mod lora;
pub mod registry;
pub mod single_file;
pub mod timestep;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
