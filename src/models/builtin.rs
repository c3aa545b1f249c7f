//! Built-in random-weight models, materialised into a diffusers-layout folder.
//!
//! The weights are made by building each network through the same loader that reads real
//! models, over [`RandomWeights`], so the folder has exactly the tensor names and shapes a
//! `save_pretrained` folder has. Values depend only on the model name and tensor name.

use super::clip::ClipTextModel;
use super::config::{ClipTextConfig, UNetConfig, VaeConfig};
use super::hub;
use super::tokenizer;
use super::unet::UNet;
use super::vae::Vae;
use super::weights::RandomWeights;
use anyhow::{Context, Result, bail};
use candle_core::Device;
use serde_json::{Value, json};
use std::fs;
use std::path::{Path, PathBuf};

/// Merges of the built-in tokenizer vocabulary (the first N of CLIP's BPE list).
const TINY_MERGES: usize = 2000;

struct Spec {
    /// `text_encoder` and, for SDXL, `text_encoder_2`.
    text_encoders: Vec<Value>,
    unet: Value,
    vae: Value,
    seed: u64,
}

fn sd15_scheduler() -> Value {
    json!({
        "_class_name": "DDIMScheduler",
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "clip_sample": false, "set_alpha_to_one": false, "steps_offset": 1,
        "num_train_timesteps": 1000, "prediction_type": "epsilon",
        "timestep_spacing": "leading", "trained_betas": null
    })
}

fn vae(block_out: &[usize], layers: usize, groups: usize, scaling: f64) -> Value {
    let n = block_out.len();
    json!({
        "_class_name": "AutoencoderKL",
        "block_out_channels": block_out, "layers_per_block": layers,
        "down_block_types": vec!["DownEncoderBlock2D"; n],
        "up_block_types": vec!["UpDecoderBlock2D"; n],
        "latent_channels": 4, "norm_num_groups": groups, "scaling_factor": scaling,
        "force_upcast": true
    })
}

fn spec(name: &str, vocab_size: usize, eos: u32) -> Result<Spec> {
    let clip = |hidden: usize,
                layers: usize,
                heads: usize,
                inter: usize,
                vocab: usize,
                act: &str,
                projection: bool| {
        json!({
            "architectures": [if projection { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }],
            "model_type": "clip_text_model",
            "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "max_position_embeddings": 77, "hidden_act": act, "layer_norm_eps": 1e-5,
            "projection_dim": hidden, "bos_token_id": eos - 1, "eos_token_id": eos,
            "pad_token_id": eos, "torch_dtype": "float32"
        })
    };
    let text = |hidden, layers, heads, inter, vocab| {
        clip(hidden, layers, heads, inter, vocab, "quick_gelu", false)
    };
    Ok(match name {
        "tiny-sd15" => Spec {
            text_encoders: vec![text(32, 2, 4, 64, vocab_size)],
            unet: json!({
                "_class_name": "UNet2DConditionModel",
                "block_out_channels": [32, 64], "layers_per_block": 1,
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                "attention_head_dim": 4, "cross_attention_dim": 32, "norm_num_groups": 8,
                "in_channels": 4, "out_channels": 4, "sample_size": 8
            }),
            vae: vae(&[16, 16, 32, 32], 1, 8, 0.18215),
            seed: 0x7117_5d15,
        },
        "random-sd15" => Spec {
            // The real SD1.5 architecture (configs of stable-diffusion-v1-5).
            text_encoders: vec![text(768, 12, 12, 3072, 49408)],
            unet: json!({
                "_class_name": "UNet2DConditionModel",
                "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32,
                "in_channels": 4, "out_channels": 4, "sample_size": 64
            }),
            vae: vae(&[128, 256, 512, 512], 2, 32, 0.18215),
            seed: 0x5d15_0001,
        },
        "tiny-sdxl" => Spec {
            text_encoders: vec![
                text(32, 2, 4, 64, vocab_size),
                clip(32, 2, 4, 64, vocab_size, "gelu", true),
            ],
            unet: json!({
                "_class_name": "UNet2DConditionModel",
                "block_out_channels": [32, 64], "layers_per_block": 1,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
                "transformer_layers_per_block": [1, 2], "attention_head_dim": [2, 4],
                "cross_attention_dim": 64, "use_linear_projection": true, "norm_num_groups": 8,
                "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 80,
                "in_channels": 4, "out_channels": 4, "sample_size": 8
            }),
            vae: vae(&[16, 16, 32, 32], 1, 8, 0.13025),
            seed: 0x7117_5d71,
        },
        "random-sdxl" => Spec {
            // The real SDXL base architecture (configs of stable-diffusion-xl-base-1.0).
            text_encoders: vec![
                text(768, 12, 12, 3072, 49408),
                clip(1280, 32, 20, 5120, 49408, "gelu", true),
            ],
            unet: json!({
                "_class_name": "UNet2DConditionModel",
                "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
                "cross_attention_dim": 2048, "use_linear_projection": true, "norm_num_groups": 32,
                "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816,
                "in_channels": 4, "out_channels": 4, "sample_size": 128
            }),
            vae: vae(&[128, 256, 512, 512], 2, 32, 0.13025),
            seed: 0x5d71_0001,
        },
        other => bail!(
            "{other} is not a built-in model (built-in: tiny-sd15, tiny-sdxl, random-sd15, random-sdxl)"
        ),
    })
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    fs::create_dir_all(path.parent().expect("has a parent"))?;
    fs::write(path, serde_json::to_string_pretty(v)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

fn save_weights(weights: &RandomWeights, path: &Path) -> Result<()> {
    let tensors = weights.tensors();
    let map: std::collections::HashMap<String, candle_core::Tensor> = tensors.into_iter().collect();
    fs::create_dir_all(path.parent().expect("has a parent"))?;
    candle_core::safetensors::save(&map, path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes the built-in model `name` as a diffusers folder at `dir` (which must not exist yet,
/// or be empty).
pub fn materialize(name: &str, dir: &Path) -> Result<()> {
    let (vocab, merges) = tokenizer::tiny_vocab(TINY_MERGES);
    let vocab_len = serde_json::from_str::<serde_json::Map<String, Value>>(&vocab)?.len();
    let eos = (vocab_len - 1) as u32;
    let spec = spec(name, vocab_len, eos)?;
    if dir.exists() && fs::read_dir(dir)?.next().is_some() {
        bail!("{} exists and is not empty", dir.display());
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    // Build in a sibling temporary folder, then rename: no half-written model is ever visible.
    let tmp = parent.join(format!(
        ".{}.tkg-tmp-{}",
        dir.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&tmp);
    let result = write_folder(&spec, &tmp, &vocab, &merges).and_then(|()| {
        if dir.exists() {
            fs::remove_dir(dir)?;
        }
        fs::rename(&tmp, dir).with_context(|| format!("moving the model into {}", dir.display()))
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

fn write_folder(spec: &Spec, dir: &Path, vocab: &str, merges: &str) -> Result<()> {
    let dev = Device::Cpu;
    let unet_cfg: UNetConfig = serde_json::from_value(spec.unet.clone())?;
    let vae_cfg: VaeConfig = serde_json::from_value(spec.vae.clone())?;

    for (i, te) in spec.text_encoders.iter().enumerate() {
        let suffix = if i == 0 {
            String::new()
        } else {
            format!("_{}", i + 1)
        };
        let cfg: ClipTextConfig = serde_json::from_value(te.clone())?;
        let w = RandomWeights::new(spec.seed ^ (0x10 + i as u64));
        ClipTextModel::load(w.var_builder(&dev), &cfg)?;
        save_weights(
            &w,
            &dir.join(format!("text_encoder{suffix}/model.safetensors")),
        )?;
        write_json(&dir.join(format!("text_encoder{suffix}/config.json")), te)?;
        // SDXL's second tokenizer pads with "!".
        let pad = if i == 0 { "<|endoftext|>" } else { "!" };
        write_tokenizer(&dir.join(format!("tokenizer{suffix}")), vocab, merges, pad)?;
    }

    let w = RandomWeights::new(spec.seed ^ 2);
    UNet::load(w.var_builder(&dev), &unet_cfg)?;
    save_weights(&w, &dir.join("unet/diffusion_pytorch_model.safetensors"))?;
    write_json(&dir.join("unet/config.json"), &spec.unet)?;

    let w = RandomWeights::new(spec.seed ^ 3);
    Vae::load(w.var_builder(&dev), &vae_cfg)?;
    save_weights(&w, &dir.join("vae/diffusion_pytorch_model.safetensors"))?;
    write_json(&dir.join("vae/config.json"), &spec.vae)?;

    write_json(
        &dir.join("scheduler/scheduler_config.json"),
        &sd15_scheduler(),
    )?;
    // model_index.json last: its presence marks a complete folder.
    write_json(
        &dir.join("model_index.json"),
        &if spec.text_encoders.len() == 2 {
            json!({
                "_class_name": "StableDiffusionXLPipeline",
                "_diffusers_version": "0.42.1",
                "force_zeros_for_empty_prompt": true,
                "scheduler": ["diffusers", "DDIMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"]
            })
        } else {
            json!({
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "scheduler": ["diffusers", "DDIMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "safety_checker": [null, null], "feature_extractor": [null, null],
                "requires_safety_checker": false
            })
        },
    )?;
    Ok(())
}

fn write_tokenizer(tok: &Path, vocab: &str, merges: &str, pad: &str) -> Result<()> {
    fs::create_dir_all(tok)?;
    fs::write(tok.join("vocab.json"), vocab)?;
    fs::write(tok.join("merges.txt"), merges)?;
    let special = json!({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": pad, "unk_token": "<|endoftext|>"
    });
    write_json(&tok.join("special_tokens_map.json"), &special)?;
    write_json(
        &tok.join("tokenizer_config.json"),
        &json!({"model_max_length": 77, "do_lower_case": true, "tokenizer_class": "CLIPTokenizer"}),
    )
}

/// The cache folder of a built-in model, materialising it first if needed.
pub fn ensure(name: &str) -> Result<PathBuf> {
    let dir = hub::builtin_cache_dir(name);
    if dir.join("model_index.json").is_file() {
        return Ok(dir);
    }
    if dir.exists() {
        // A folder without its completion marker is debris from an interrupted run.
        fs::remove_dir_all(&dir).with_context(|| format!("cleaning {}", dir.display()))?;
    }
    materialize(name, &dir)?;
    Ok(dir)
}

/// The configs of a built-in architecture (`random-sd15` / `random-sdxl` are the real SD1.5
/// and SDXL base configs), as their `config.json` values; text encoders for the full CLIP
/// vocabulary. Single-file checkpoints take their configs from here.
pub struct Architecture {
    pub text_encoders: Vec<Value>,
    pub unet: Value,
    pub vae: Value,
    pub scheduler: Value,
}

/// See [`Architecture`].
pub fn architecture(name: &str) -> Result<Architecture> {
    let spec = spec(name, 49408, 49407)?;
    Ok(Architecture {
        text_encoders: spec.text_encoders,
        unet: spec.unet,
        vae: spec.vae,
        scheduler: sd15_scheduler(),
    })
}
