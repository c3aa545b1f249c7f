//! Segment Anything (Kirillov et al. 2023) and its pruned SlimSAM (Chen et al. 2023), read from
//! transformers `SamModel` folders (config.json, model.safetensors, preprocessor_config.json,
//! transformers' tensor names), with `SamProcessor`'s pre- and post-processing.
//!
//! SlimSAM's Hub checkpoints (Zigeng/SlimSAM-uniform-50 and -77) express their pruning in the
//! config: a narrower ViT (`hidden_size` 384 and 168 against SAM ViT-B's 768, still 12 heads,
//! so head widths 32 and 14) with an `mlp_dim` that is not 4 x hidden (1536, 696); the prompt
//! encoder and the mask decoder are SAM's. Every width here comes from config.json and each
//! tensor's shape is checked against it, so any such pruning loads and anything that does not
//! agree is refused by name.

pub mod config;
pub mod image_encoder;
pub mod mask_decoder;
pub mod processor;
pub mod prompt_encoder;

use crate::models::weights::WeightFile;
use crate::segment::{Prompt, Segmenter, SubjectMask};
use anyhow::{Context, Result, ensure};
use candle_core::{DType, Device, Tensor};
use config::{ProcessorConfig, SamConfig};
use image::RgbImage;
use image_encoder::ImageEncoder;
use mask_decoder::MaskDecoder;
use prompt_encoder::{ModelPrompt, PositionalEmbedding, PromptEncoder};
use std::path::Path;

/// The files of a SAM folder.
pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";
pub const PREPROCESSOR: &str = "preprocessor_config.json";

/// A whole `SamModel`.
pub struct SamModel {
    pub config: SamConfig,
    pub processor: ProcessorConfig,
    image_encoder: ImageEncoder,
    positional: PositionalEmbedding,
    prompt_encoder: PromptEncoder,
    mask_decoder: MaskDecoder,
    /// The image-wide positional embedding [1, D, g, g], computed once.
    image_pe: Tensor,
    device: Device,
}

/// What SAM predicts for one prompt.
#[derive(Debug, Clone)]
pub struct Prediction {
    /// Low-resolution logits [1, M, 4g, 4g] (transformers' `pred_masks` without its point
    /// batch axis).
    pub low_res: Tensor,
    /// The predicted IoU of each mask.
    pub iou: Vec<f32>,
    /// Each mask's logits at the image's size, row-major; the mask is where they are > 0.
    pub logits: Vec<Vec<f32>>,
    pub width: u32,
    pub height: u32,
}

impl Prediction {
    /// The index of the mask with the highest predicted IoU.
    pub fn best(&self) -> usize {
        (0..self.iou.len())
            .max_by(|&a, &b| self.iou[a].total_cmp(&self.iou[b]))
            .unwrap_or(0)
    }

    /// Mask `i` thresholded at 0, as a hard [`SubjectMask`].
    pub fn mask(&self, i: usize) -> SubjectMask {
        SubjectMask {
            width: self.width,
            height: self.height,
            values: self.logits[i]
                .iter()
                .map(|&v| if v > 0.0 { 1.0 } else { 0.0 })
                .collect(),
        }
    }
}

impl SamModel {
    /// Loads a transformers SAM folder; a missing or inconsistent file is an error that names
    /// it.
    pub fn load_dir(dir: &Path, device: &Device) -> Result<Self> {
        let read = |name: &str| -> Result<String> {
            let p = dir.join(name);
            ensure!(
                p.is_file(),
                "{} is not a SAM folder: it has no {name} (a transformers SamModel saved with \
                 save_pretrained has config.json, model.safetensors and preprocessor_config.json)",
                dir.display()
            );
            crate::limits::read_text_bounded(&p, 1 << 20)
        };
        let config = SamConfig::from_json(&read(CONFIG)?)
            .with_context(|| format!("{}", dir.join(CONFIG).display()))?;
        let processor = ProcessorConfig::from_json(&read(PREPROCESSOR)?)
            .with_context(|| format!("{}", dir.join(PREPROCESSOR).display()))?;
        let weights = dir.join(WEIGHTS);
        ensure!(
            weights.is_file(),
            "{} is not a SAM folder: it has no {WEIGHTS} (.bin pickles are not read; convert \
             them to safetensors)",
            dir.display()
        );
        let file = WeightFile::open(&weights)?;
        let model = Self::load(&file, config, processor, device)
            .with_context(|| format!("loading SAM from {}", dir.display()))?;
        // The prompt encoder's copy of the shared Gaussian is the tensor read (tied in
        // transformers); older files carry both names.
        file.ensure_all_used(|n| n == "prompt_encoder.shared_embedding.positional_embedding")?;
        Ok(model)
    }

    fn load(
        file: &std::sync::Arc<WeightFile>,
        config: SamConfig,
        processor: ProcessorConfig,
        device: &Device,
    ) -> Result<Self> {
        let vb = file.var_builder(DType::F32, device);
        // transformers ties the two; files written by transformers 5 keep only the first.
        let name = [
            "shared_image_embedding.positional_embedding",
            "prompt_encoder.shared_embedding.positional_embedding",
        ]
        .into_iter()
        .find(|n| file.contains(n))
        .context("the weights have no shared_image_embedding.positional_embedding")?;
        Self::build(vb, name, config, processor, device)
    }

    /// The model from `vb`, its shared Gaussian read as `positional_name`.
    fn build(
        vb: candle_nn::VarBuilder,
        positional_name: &str,
        config: SamConfig,
        processor: ProcessorConfig,
        device: &Device,
    ) -> Result<Self> {
        let feats = config.vision.num_pos_feats;
        let gaussian = vb.get((2, feats), positional_name)?;
        let positional = PositionalEmbedding::new(gaussian);
        let image_pe = positional.image_wide(config.vision.grid())?;
        if let Some((ph, pw)) = processor.pad {
            ensure!(
                ph == config.vision.image_size && pw == config.vision.image_size,
                "the processor pads to {pw}x{ph} but the image encoder takes {s}x{s}",
                s = config.vision.image_size
            );
        }
        Ok(Self {
            image_encoder: ImageEncoder::load(vb.pp("vision_encoder"), &config.vision)?,
            prompt_encoder: PromptEncoder::load(vb.pp("prompt_encoder"), &config.prompt)?,
            mask_decoder: MaskDecoder::load(vb.pp("mask_decoder"), &config.decoder)?,
            positional,
            image_pe,
            config,
            processor,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The image embeddings [1, C, g, g] of the processor's pixels [1, 3, S, S].
    pub fn embed_image(&self, pixels: &Tensor) -> Result<Tensor> {
        self.image_encoder.forward(pixels)
    }

    /// Mask logits [1, M, 4g, 4g] and IoU predictions [1, M] for a prompt in model
    /// coordinates.
    pub fn decode(
        &self,
        embeddings: &Tensor,
        prompt: &ModelPrompt,
        multimask: bool,
    ) -> Result<mask_decoder::Decoded> {
        self.decode_with_mask(embeddings, prompt, None, multimask)
    }

    /// [`decode`](Self::decode) with a mask prompt as well: low-resolution logits
    /// [1, 1, 4g, 4g], usually one of a previous prediction's `low_res` masks, to refine it.
    pub fn decode_with_mask(
        &self,
        embeddings: &Tensor,
        prompt: &ModelPrompt,
        mask: Option<&Tensor>,
        multimask: bool,
    ) -> Result<mask_decoder::Decoded> {
        let (sparse, dense) = self
            .prompt_encoder
            .forward(&self.positional, prompt, mask)?;
        self.mask_decoder
            .forward(embeddings, &self.image_pe, &sparse, &dense, multimask)
    }

    /// The whole path on an image: process, encode, decode, post-process.
    pub fn predict(
        &self,
        image: &RgbImage,
        prompt: &Prompt,
        multimask: bool,
    ) -> Result<Prediction> {
        self.predict_with_mask(image, prompt, None, multimask)
    }

    /// [`predict`](Self::predict) with a mask prompt (see [`decode_with_mask`](Self::decode_with_mask)).
    pub fn predict_with_mask(
        &self,
        image: &RgbImage,
        prompt: &Prompt,
        mask: Option<&Tensor>,
        multimask: bool,
    ) -> Result<Prediction> {
        let original = (image.height() as usize, image.width() as usize);
        crate::limits::check_image_size(original.1, original.0).map_err(anyhow::Error::msg)?;
        let model_prompt = self.processor.transform_prompt(prompt, original)?;
        let processed = self.processor.preprocess(image, &self.device)?;
        let embeddings = self.embed_image(&processed.pixels)?;
        let decoded = self.decode_with_mask(&embeddings, &model_prompt, mask, multimask)?;
        let iou = decoded.iou.flatten_all()?.to_vec1::<f32>()?;
        let (_, m, lh, lw) = decoded.masks.dims4()?;
        let low = decoded.masks.flatten_all()?.to_vec1::<f32>()?;
        ensure!(
            low.iter().chain(&iou).all(|v| v.is_finite()),
            "SAM's output is not finite"
        );
        let logits = (0..m)
            .map(|i| {
                self.processor.upscale_logits(
                    &low[i * lh * lw..(i + 1) * lh * lw],
                    (lh, lw),
                    processed.reshaped,
                    original,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Prediction {
            low_res: decoded.masks,
            iou,
            logits,
            width: image.width(),
            height: image.height(),
        })
    }
}

/// The built-in random-weight SAM: SAM's architecture at toy widths (a 32-wide, 3-layer ViT
/// with one global layer, 64² input), for smoke tests and CI; its masks mean nothing.
pub const TINY_SAM: &str = "tiny-sam";

const TINY_SAM_CONFIG: &str = r#"{
  "model_type": "sam",
  "vision_config": {"hidden_size": 32, "mlp_dim": 128, "num_hidden_layers": 3,
    "num_attention_heads": 2, "global_attn_indexes": [2], "window_size": 4, "patch_size": 8,
    "image_size": 64, "output_channels": 32, "num_pos_feats": 16},
  "prompt_encoder_config": {"hidden_size": 32, "image_embedding_size": 8, "image_size": 64,
    "patch_size": 8, "mask_input_channels": 8},
  "mask_decoder_config": {"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2,
    "num_hidden_layers": 2, "iou_head_hidden_dim": 32, "iou_head_depth": 3}
}
"#;

const TINY_SAM_PREPROCESSOR: &str = r#"{
  "do_convert_rgb": true, "do_normalize": true, "do_pad": true, "do_rescale": true,
  "do_resize": true, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
  "image_processor_type": "SamImageProcessor", "resample": 2,
  "rescale_factor": 0.00392156862745098, "size": {"longest_edge": 64},
  "pad_size": {"height": 64, "width": 64}, "mask_size": {"longest_edge": 256},
  "mask_pad_size": {"height": 256, "width": 256}
}
"#;

/// [`TINY_SAM`]'s folder in the built-in models' cache, written on first use.
pub fn tiny_sam_folder() -> Result<std::path::PathBuf> {
    crate::models::builtin::ensure_cached(TINY_SAM, WEIGHTS, |dir| {
        crate::models::builtin::build_folder(dir, write_tiny_sam)
            .with_context(|| format!("cannot write {TINY_SAM}"))
    })
}

/// Writes [`TINY_SAM`]'s three files into the empty folder `dir`: the configs, and the
/// deterministic random weights the network asks for as it is built.
fn write_tiny_sam(dir: &Path) -> Result<()> {
    let config = SamConfig::from_json(TINY_SAM_CONFIG)?;
    let processor = ProcessorConfig::from_json(TINY_SAM_PREPROCESSOR)?;
    let weights = crate::models::weights::RandomWeights::new(0x5a_3001);
    SamModel::build(
        weights.var_builder(&Device::Cpu),
        "shared_image_embedding.positional_embedding",
        config,
        processor,
        &Device::Cpu,
    )?;
    let map: std::collections::HashMap<String, Tensor> = weights.tensors().into_iter().collect();
    candle_core::safetensors::save(&map, dir.join(WEIGHTS))?;
    for (name, text) in [
        (CONFIG, TINY_SAM_CONFIG),
        (PREPROCESSOR, TINY_SAM_PREPROCESSOR),
    ] {
        std::fs::write(dir.join(name), text)
            .with_context(|| format!("cannot write {}", dir.join(name).display()))?;
    }
    Ok(())
}

/// A `SamModel` repository on the Hub, read through the Hugging Face cache as the SD models
/// are (offline when `HF_HUB_OFFLINE` says so): the snapshot folder holding its three files,
/// fetched where they are missing.
pub fn hub_folder(repo: &str, revision: &str) -> Result<std::path::PathBuf> {
    let folder = crate::models::hub::ModelFolder::hub(repo, revision)?
        .with_layout(crate::models::hub::Layout::SamModel);
    let mut root = None;
    for name in [CONFIG, PREPROCESSOR, WEIGHTS] {
        let path = folder
            .file(name)
            .with_context(|| format!("SAM repository {repo}"))?;
        root = path.parent().map(Path::to_path_buf);
    }
    root.with_context(|| format!("internal error: no folder for {repo}"))
}

/// SAM behind the [`Segmenter`] interface: the multimask output's mask with the highest
/// predicted IoU, thresholded at 0.
pub struct SamSegmenter {
    name: String,
    pub model: SamModel,
}

impl SamSegmenter {
    pub fn load(dir: &Path, name: &str, device: &Device) -> Result<Self> {
        Ok(Self {
            name: name.to_string(),
            model: SamModel::load_dir(dir, device)?,
        })
    }
}

impl Segmenter for SamSegmenter {
    fn name(&self) -> &str {
        &self.name
    }

    fn segment(&self, image: &RgbImage, prompt: &Prompt) -> Result<SubjectMask> {
        let p = self.model.predict(image, prompt, true)?;
        Ok(p.mask(p.best()))
    }

    fn wants_prompt(&self) -> bool {
        true
    }
}
