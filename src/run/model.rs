//! Which model a job names, and loading it with the run's LoRAs and VAE: a registry name, a
//! diffusers folder or a single-file checkpoint, resolved to files, plus what the registry
//! says about it (default size and shift, fp16 files, a VAE for half precision).

use super::RunConfig;
use crate::models::builtin;
use crate::models::hub::{self, ModelFolder};
use crate::models::lora::{self, LoraSpec};
use crate::models::registry::{ModelEntry, Registry, Source};
use crate::pipeline::{Adapters, LoadOptions, ModelSource, Pipeline, VaeSource};
use crate::settings::Settings;
use anyhow::{Result, bail};
use candle_core::DType;
use std::path::{Path, PathBuf};

/// What the registry says a model's images default to.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ModelDefaults {
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub tkg_shift: Option<f64>,
    pub sampling: crate::sampling::SamplingDefaults,
}

/// A model resolved to its files.
#[derive(Debug)]
pub struct ResolvedModel {
    pub name: String,
    /// The model's folder (for a single file: the folder the file is in).
    pub folder: ModelFolder,
    /// A single-file checkpoint (--model-file, or a registry entry `file = ...`).
    pub file: Option<PathBuf>,
    pub defaults: ModelDefaults,
    /// Whether `*.fp16.safetensors` files are preferred when the dtype is f16: always for a
    /// folder, and for a registry entry when it says `fp16_variant = true`.
    pub fp16_files: bool,
    /// The registry's VAE for f16/bf16 (an entry's `vae`).
    pub half_vae: Option<ModelEntry>,
}

/// Resolves the model of `s` (or the run's `--model-file`). `notice` hears about slow
/// one-time work (materialising a built-in model).
pub fn resolve(s: &Settings, cfg: &RunConfig, notice: &dyn Fn(String)) -> Result<ResolvedModel> {
    if let Some(p) = &cfg.model_file {
        let name = p
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.display().to_string());
        return resolve_file(p, name);
    }
    if let Some(dir) = &s.model_dir {
        return Ok(ResolvedModel {
            name: s.model.clone(),
            folder: ModelFolder::local(dir)?,
            file: None,
            defaults: ModelDefaults::default(),
            fp16_files: true,
            half_vae: None,
        });
    }
    let registry = Registry::load(cfg.registry_file.as_ref())?;
    let entry = registry.get(&s.model)?;
    let folder = match &entry.source {
        Source::Builtin => {
            let dir = hub::builtin_cache_dir(&entry.name);
            if !dir.join("model_index.json").is_file() {
                notice(format!(
                    "materialising built-in model {} into {}",
                    entry.name,
                    dir.display()
                ));
            }
            ModelFolder::local(&builtin::ensure(&entry.name)?)?
        }
        Source::File(p) => return resolve_file(p, entry.name.clone()),
        _ => {
            let folder = entry
                .folder()?
                .with_progress(cfg.download_progress)
                .with_notice_sink(cfg.download_notices.clone());
            // The entry's family decides defaults; the configs must agree with it.
            entry.check_family(crate::pipeline::detect_family(&folder)?)?;
            folder
        }
    };
    Ok(ResolvedModel {
        name: entry.name.clone(),
        folder,
        file: None,
        defaults: ModelDefaults {
            width: entry.width.map(|v| v as usize),
            height: entry.height.map(|v| v as usize),
            tkg_shift: entry.tkg_shift,
            sampling: entry.sampling,
        },
        fp16_files: entry.fp16_variant,
        half_vae: registry.vae_for(entry)?,
    })
}

fn resolve_file(path: &Path, name: String) -> Result<ResolvedModel> {
    crate::models::single_file::check_extension(path)?;
    if !path.is_file() {
        bail!("{}: no such file", path.display());
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(ResolvedModel {
        name,
        folder: ModelFolder::local(parent)?,
        file: Some(path.to_path_buf()),
        defaults: ModelDefaults::default(),
        fp16_files: true,
        half_vae: None,
    })
}

impl ResolvedModel {
    /// The VAE to load instead of the model's own: `--vae`, else the registry's VAE when
    /// the tensors are half precision (not for bf16 on the CPU, whose tensors are f32 with
    /// bf16 products: nothing there overflows).
    pub fn vae_source(
        &self,
        vae_arg: Option<&Path>,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Option<VaeSource>> {
        let half_tensors = match dtype {
            DType::F16 => true,
            DType::BF16 => !device.is_cpu(),
            _ => false,
        };
        if let Some(p) = vae_arg {
            return Ok(Some(if p.is_dir() {
                VaeSource::Folder(ModelFolder::local(p)?)
            } else if p.is_file() {
                VaeSource::File(p.to_path_buf())
            } else {
                bail!("--vae {}: no such file or folder", p.display())
            }));
        }
        match &self.half_vae {
            Some(entry) if half_tensors => Ok(Some(VaeSource::Folder(entry.folder()?))),
            _ => Ok(None),
        }
    }

    /// Loads the model with the run's `--lora`s, then `job_loras` (a batch job's `lora`
    /// list), then the `<lora:...>` tags of `prompts` (which must all carry the same tags).
    pub fn load(
        &self,
        cfg: &RunConfig,
        job_loras: &[String],
        prompts: &[&str],
        opts: &LoadOptions,
    ) -> Result<Pipeline> {
        let mut loras = cfg
            .loras
            .iter()
            .chain(job_loras)
            .map(|a| LoraSpec::parse(a))
            .collect::<Result<Vec<_>>>()?;
        let tags = match prompts.first() {
            Some(p) => lora::prompt_tags(p)?,
            None => Vec::new(),
        };
        for p in prompts.iter().skip(1) {
            if lora::prompt_tags(p)? != tags {
                bail!(
                    "prompts with different <lora:...> tags cannot share one model load yet; put them in separate runs"
                );
            }
        }
        for t in &tags {
            loras.push(lora::resolve_tag(t, cfg.lora_dir.as_deref())?);
        }
        let adapters = Adapters {
            loras,
            lora_strict: cfg.lora_strict,
            vae: self.vae_source(cfg.vae.as_deref(), opts.dtype, &opts.device)?,
        };
        let source = match &self.file {
            Some(path) => ModelSource::File { path, config: None },
            None => ModelSource::Folder(&self.folder),
        };
        let opts = LoadOptions {
            fp16_files: self.fp16_files,
            ..opts.clone()
        };
        Pipeline::load_with(source, &opts, &adapters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with(models_file: &Path) -> RunConfig {
        RunConfig {
            registry_file: Some(crate::models::registry::UserFile {
                path: models_file.to_path_buf(),
                home: None,
            }),
            ..RunConfig::default()
        }
    }

    /// The registry's `vae` is used for half precision only, and `fp16_variant` decides
    /// whether fp16 weight files are preferred.
    #[test]
    fn registry_vae_and_fp16_variant_are_honoured() {
        let dir = std::env::temp_dir().join(format!("tkg-model-test-{}", std::process::id()));
        let (model, plain, vae) = (dir.join("m"), dir.join("p"), dir.join("v"));
        std::fs::create_dir_all(model.join("text_encoder_2")).unwrap();
        std::fs::create_dir_all(plain.join("unet")).unwrap();
        std::fs::create_dir_all(&vae).unwrap();
        // Just enough config to tell the families apart.
        std::fs::write(model.join("text_encoder_2/config.json"), "{}").unwrap();
        std::fs::write(
            plain.join("unet/config.json"),
            r#"{"down_block_types": [], "up_block_types": [], "block_out_channels": []}"#,
        )
        .unwrap();
        let toml = dir.join("models.toml");
        std::fs::write(
            &toml,
            "[models.mine]\nfamily = \"sdxl\"\ndir = \"m\"\nvae = \"myvae\"\nwidth = 640\n\
             [models.myvae]\nfamily = \"sdxl\"\nkind = \"vae\"\ndir = \"v\"\n\
             [models.plain]\nfamily = \"sd15\"\ndir = \"p\"\nfp16_variant = true\n\
             [models.wrong]\nfamily = \"sd15\"\ndir = \"m\"\n",
        )
        .unwrap();
        let cfg = config_with(&toml);
        let s = Settings {
            model: "mine".into(),
            ..Settings::default()
        };
        let m = resolve(&s, &cfg, &|_| {}).unwrap();
        assert!(!m.fp16_files);
        assert_eq!(m.defaults.width, Some(640));
        assert!(
            m.vae_source(None, DType::F32, &candle_core::Device::Cpu)
                .unwrap()
                .is_none()
        );
        match m
            .vae_source(None, DType::F16, &candle_core::Device::Cpu)
            .unwrap()
        {
            Some(VaeSource::Folder(f)) => assert_eq!(f.root().unwrap(), vae),
            other => panic!("expected the registry's VAE folder, got {other:?}"),
        }
        // bf16 on the CPU has f32 tensors: the model's own VAE.
        assert!(
            m.vae_source(None, DType::BF16, &candle_core::Device::Cpu)
                .unwrap()
                .is_none()
        );
        let s = Settings {
            model: "plain".into(),
            ..Settings::default()
        };
        let m = resolve(&s, &cfg, &|_| {}).unwrap();
        assert!(m.fp16_files && m.half_vae.is_none());
        assert!(
            m.vae_source(None, DType::F16, &candle_core::Device::Cpu)
                .unwrap()
                .is_none()
        );
        // An entry whose family its configs contradict is refused, not taken on trust.
        let s = Settings {
            model: "wrong".into(),
            ..Settings::default()
        };
        let err = format!("{:#}", resolve(&s, &cfg, &|_| {}).unwrap_err());
        assert!(err.contains("listed as sd15"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
