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
use anyhow::{Context, Result, anyhow, bail};
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

/// `sample_size`: the real configs' (the tile size of a tiled decode); the tiny models have
/// none, as before it was read.
fn vae(
    block_out: &[usize],
    layers: usize,
    groups: usize,
    scaling: f64,
    sample_size: Option<usize>,
) -> Value {
    let n = block_out.len();
    let mut v = json!({
        "_class_name": "AutoencoderKL",
        "block_out_channels": block_out, "layers_per_block": layers,
        "down_block_types": vec!["DownEncoderBlock2D"; n],
        "up_block_types": vec!["UpDecoderBlock2D"; n],
        "latent_channels": 4, "norm_num_groups": groups, "scaling_factor": scaling,
        "force_upcast": true
    });
    if let Some(size) = sample_size {
        v["sample_size"] = json!(size);
    }
    v
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
        // 9-channel inpainting variants: the same model with latents, mask and masked-image
        // latents as UNet input (SD1.5 / SDXL inpainting's layout); other weights.
        "tiny-sd15-inpaint" | "tiny-sdxl-inpaint" => {
            let mut spec = spec(name.trim_end_matches("-inpaint"), vocab_size, eos)?;
            spec.unet["in_channels"] = json!(9);
            spec.seed ^= 0x1a9a_1a7f;
            spec
        }
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
            vae: vae(&[16, 16, 32, 32], 1, 8, 0.18215, None),
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
            vae: vae(&[128, 256, 512, 512], 2, 32, 0.18215, Some(512)),
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
            vae: vae(&[16, 16, 32, 32], 1, 8, 0.13025, None),
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
            vae: vae(&[128, 256, 512, 512], 2, 32, 0.13025, Some(1024)),
            seed: 0x5d71_0001,
        },
        other => bail!(
            "{other} is not a built-in model (built-in: tiny-sd15, tiny-sdxl, tiny-sd15-inpaint, tiny-sdxl-inpaint, random-sd15, random-sdxl)"
        ),
    })
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    create_parent(path)?;
    fs::write(path, serde_json::to_string_pretty(v)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}

fn save_weights(weights: &RandomWeights, path: &Path) -> Result<()> {
    let tensors = weights.tensors();
    let map: std::collections::HashMap<String, candle_core::Tensor> = tensors.into_iter().collect();
    create_parent(path)?;
    candle_core::safetensors::save(&map, path)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn create_parent(path: &Path) -> Result<()> {
    let dir = path.parent().expect("a file in the model folder");
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// "cannot create DIR: ..." for an io error on `dir`. ENOTDIR and EEXIST do not say which
/// part of the path is in the way, so a file among `dir` and its ancestors is named instead.
fn cannot_create(dir: &Path, e: std::io::Error) -> anyhow::Error {
    let file = dir
        .ancestors()
        .find(|a| fs::metadata(a).is_ok_and(|m| !m.is_dir()));
    match file {
        Some(f) if f == dir => anyhow!(
            "cannot create {}: a file of that name exists",
            dir.display()
        ),
        Some(f) => anyhow!(
            "cannot create {}: {} is a file, not a folder",
            dir.display(),
            f.display()
        ),
        None => anyhow::Error::new(e).context(format!("cannot create {}", dir.display())),
    }
}

/// Writes the built-in model `name` as a diffusers folder at `dir` (which must not exist yet,
/// or be empty). Every file-system error names the path it is about.
pub fn materialize(name: &str, dir: &Path) -> Result<()> {
    let (vocab, merges) = tokenizer::tiny_vocab(TINY_MERGES);
    let vocab_len = serde_json::from_str::<serde_json::Map<String, Value>>(&vocab)?.len();
    let eos = (vocab_len - 1) as u32;
    let spec = spec(name, vocab_len, eos)?;
    // The model is renamed into place, which needs a last component to name.
    if dir.file_name().is_none() {
        bail!(
            "cannot create {}: give the new folder a name, e.g. {}",
            dir.display(),
            dir.join(name).display()
        );
    }
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => {
            let mut entries =
                fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
            if entries.next().is_some() {
                bail!("{} exists and is not empty", dir.display());
            }
        }
        Ok(_) => bail!(
            "cannot create {}: a file of that name exists",
            dir.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(cannot_create(dir, e)),
    }
    build_folder(dir, |tmp| write_folder(&spec, tmp, &vocab, &merges))
}

/// Makes the folder `dir` (absent, or empty) with `write`, which fills a sibling temporary
/// folder that is then renamed into place: no half-written model is ever visible, and a
/// failed one leaves nothing behind.
pub(crate) fn build_folder(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let leaf = dir
        .file_name()
        .with_context(|| format!("cannot create {}: the folder needs a name", dir.display()))?;
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| cannot_create(dir, e))?;
    let tmp = parent.join(format!(
        ".{}.tkg-tmp-{}",
        leaf.to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&tmp);
    // Creating the sibling is where an unwritable parent shows: say so about `dir`.
    fs::create_dir(&tmp).map_err(|e| cannot_create(dir, e))?;
    let result = write(&tmp)
        .with_context(|| format!("cannot create {}", dir.display()))
        .and_then(|()| {
            if dir.exists() {
                fs::remove_dir(dir).with_context(|| {
                    format!("cannot replace the empty folder {}", dir.display())
                })?;
            }
            fs::rename(&tmp, dir)
                .with_context(|| format!("cannot move the model into {}", dir.display()))
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
    fs::create_dir_all(tok).with_context(|| format!("cannot create {}", tok.display()))?;
    for (file, text) in [("vocab.json", vocab), ("merges.txt", merges)] {
        let p = tok.join(file);
        fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
    }
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
    ensure_cached(name, "model_index.json", |dir| materialize(name, dir))
}

/// The built-in models' cache folder of `name`, made by `make` (given the absent folder) when
/// its completion marker `marker` is missing.
pub(crate) fn ensure_cached(
    name: &str,
    marker: &str,
    make: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let dir = hub::builtin_cache_dir(name);
    if dir.join(marker).is_file() {
        return Ok(dir);
    }
    if dir.exists() {
        // A folder without its completion marker is debris from an interrupted run.
        fs::remove_dir_all(&dir).with_context(|| format!("cleaning {}", dir.display()))?;
    }
    make(&dir)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("tkg-builtin-test-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// The whole error chain, which must be one line naming `dir`.
    fn error_for(dir: &Path) -> String {
        let err = format!("{:#}", materialize("tiny-sd15", dir).unwrap_err());
        assert!(!err.contains('\n'), "{err}");
        assert!(
            err.starts_with(&format!("cannot create {}", dir.display())),
            "{err}"
        );
        err
    }

    #[test]
    fn materialize_below_a_file_names_the_file() {
        let t = TempDir::new("below-file");
        let file = t.0.join("plain");
        fs::write(&file, "x").unwrap();
        assert!(error_for(&file).contains("a file of that name exists"));
        for dir in [file.join("m"), file.join("a/b")] {
            let err = error_for(&dir);
            assert!(
                err.contains(&format!("{} is a file, not a folder", file.display())),
                "{err}"
            );
        }
        // Nothing was left behind next to the file.
        assert_eq!(fs::read_dir(&t.0).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn materialize_into_an_unwritable_folder_names_the_folder() {
        use std::os::unix::fs::PermissionsExt;
        let t = TempDir::new("unwritable");
        let ro = t.0.join("ro");
        fs::create_dir(&ro).unwrap();
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
        // Root writes anyway: then there is nothing to refuse.
        let writable = fs::write(ro.join("probe"), "x").is_ok();
        let result = (!writable).then(|| error_for(&ro.join("m")));
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o755)).unwrap();
        match result {
            Some(err) => assert!(err.contains("Permission denied"), "{err}"),
            None => eprintln!("skipped: this user can write into {}", ro.display()),
        }
    }

    #[test]
    fn materialize_needs_a_folder_name() {
        let err = format!(
            "{:#}",
            materialize("tiny-sd15", Path::new("..")).unwrap_err()
        );
        assert!(err.contains("give the new folder a name"), "{err}");
    }
}
