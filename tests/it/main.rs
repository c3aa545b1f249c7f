//! Every integration test in one binary: the tkg library and its dependencies are linked
//! once, not once per file, which saves CI minutes. Each module is one former test file; the
//! binary's tests are `MODULE::TEST` (e.g. `cargo test --test it hostile::`).

mod common;

mod batch_run;
mod cli_generate;
mod hostile;
mod hostile_info;
mod hub_download;
mod insertion_cli;
mod insertion_parity;
mod key_cli;
mod key_robustness;
mod keyability_cli;
mod lora_cli;
mod lora_parity;
mod parity;
mod sam_parity;
mod sampler_parity;
mod segment;
mod single_file_load;
mod tkg_reference;
mod tokenizer_parity;
mod vae_tiling;
