//! The model bundle: a directory with `model.safetensors` and `manifest.json`.
//!
//! The manifest carries everything serving needs besides the weights (architecture, feature
//! spec, scaler, window length, threshold) and everything a reviewer wants to know (data, periods,
//! metrics, history). Loading verifies the weights' sha256, every shape, and that the spec,
//! scaler and architecture agree, and refuses a bundle that does not.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::config::ModelConfig;
use super::fast::FastModel;
use super::network::AttentionLstm;
use crate::features::{RobustScaler, WindowBuilder};
use crate::schema::FeatureSpec;

/// File name of the weights inside a bundle.
pub const BUNDLE_WEIGHTS: &str = "model.safetensors";
/// File name of the manifest inside a bundle.
pub const BUNDLE_MANIFEST: &str = "manifest.json";
/// Manifest format this build reads and writes.
pub const MANIFEST_FORMAT: u32 = 1;

/// The alert threshold and how it was chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThresholdInfo {
    /// Alert when score >= value.
    pub value: f64,
    /// The rule, e.g. `{"rule": "max_f1"}`.
    pub rule: super::threshold::ThresholdRule,
    /// What the rule gave on the validation period.
    pub on_validation: super::threshold::Choice,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub format: u32,
    /// Model name (alerts carry it).
    pub name: String,
    /// Unique version id: creation time and the start of the weights' hash.
    pub version: String,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// Layer sizes.
    pub architecture: ModelConfig,
    /// Trainable parameters.
    pub parameters: usize,
    /// How records become features.
    pub spec: FeatureSpec,
    /// The scaler fitted on the training period.
    pub scaler: RobustScaler,
    /// Transactions per window.
    pub window: usize,
    /// The alert threshold.
    pub threshold: ThresholdInfo,
    /// What the model was trained on, its settings, metrics and per-epoch history.
    pub training: serde_json::Value,
    /// sha256 of `model.safetensors`, hex.
    pub weights_sha256: String,
}

/// Why a bundle could not be written or loaded.
#[derive(Debug, Error)]
pub enum BundleError {
    /// The directory has no manifest: not a bundle (a typo, or the wrong directory).
    #[error(
        "{dir} is not a model bundle (no {BUNDLE_MANIFEST}): give a directory `fraudstream train --out` wrote, or leave out --model for the built-in model"
    )]
    NotABundle {
        /// The directory given.
        dir: PathBuf,
    },
    /// A file of the bundle could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The manifest is not valid JSON for this format.
    #[error("{path}: invalid manifest: {source}")]
    Manifest {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// The weights file does not match the manifest's checksum.
    #[error(
        "{path}: sha256 {actual} does not match the manifest's {expected}: corrupt or replaced"
    )]
    Checksum {
        /// The weights file.
        path: PathBuf,
        /// From the manifest.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// Parts of the bundle disagree (spec vs scaler vs architecture vs weights).
    #[error("{path}: inconsistent bundle: {reason}")]
    Mismatch {
        /// The bundle directory.
        path: PathBuf,
        /// What disagrees.
        reason: String,
    },
    /// The weights could not be decoded or do not fit the architecture.
    #[error("{path}: weights do not fit the architecture: {source}")]
    Weights {
        /// The weights file.
        path: PathBuf,
        /// The cause.
        source: candle_core::Error,
    },
}

/// A loaded, verified model: the network plus what serving needs around it.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The manifest.
    pub manifest: Manifest,
    /// The candle network (training's implementation; reference for tests).
    pub model: AttentionLstm,
    /// The same network as plain vectors: what evaluation and serving score with.
    pub fast: FastModel,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Bundle {
    /// Writes weights (named tensors) and the manifest into `dir`, filling in the checksum and
    /// version. Returns the final manifest.
    pub fn save(
        dir: &Path,
        weights: &HashMap<String, Tensor>,
        mut manifest: Manifest,
    ) -> Result<Manifest, BundleError> {
        let io = |path: PathBuf| move |source| BundleError::Io { path, source };
        std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
        let wpath = dir.join(BUNDLE_WEIGHTS);
        candle_core::safetensors::save(weights, &wpath).map_err(|source| BundleError::Weights {
            path: wpath.clone(),
            source,
        })?;
        let bytes = std::fs::read(&wpath).map_err(io(wpath.clone()))?;
        manifest.weights_sha256 = sha256_hex(&bytes);
        if manifest.version.is_empty() {
            let stamp = chrono::Utc::now().format("%Y%m%d%H%M%S");
            manifest.version = format!("{stamp}-{}", &manifest.weights_sha256[..8]);
        }
        let mpath = dir.join(BUNDLE_MANIFEST);
        let json = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
        std::fs::write(&mpath, json + "\n").map_err(io(mpath))?;
        Ok(manifest)
    }

    /// Reads only the manifest (no verification): for reports about a bundle.
    pub fn read_manifest(dir: &Path) -> Result<Manifest, BundleError> {
        let mpath = dir.join(BUNDLE_MANIFEST);
        if !mpath.exists() {
            return Err(BundleError::NotABundle {
                dir: dir.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(&mpath).map_err(|source| BundleError::Io {
            path: mpath.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| BundleError::Manifest {
            path: mpath,
            source,
        })
    }

    /// Loads and verifies a bundle directory.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, BundleError> {
        let mpath = dir.join(BUNDLE_MANIFEST);
        if !mpath.exists() {
            return Err(BundleError::NotABundle {
                dir: dir.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(&mpath).map_err(|source| BundleError::Io {
            path: mpath.clone(),
            source,
        })?;
        let wpath = dir.join(BUNDLE_WEIGHTS);
        let bytes = std::fs::read(&wpath).map_err(|source| BundleError::Io {
            path: wpath.clone(),
            source,
        })?;
        Self::from_parts(dir, &text, &bytes, device)
    }

    /// The default model (`models/default`), compiled into the binary so `serve` and `demo`
    /// work from any directory.
    pub fn embedded_default(device: &Device) -> Result<Self, BundleError> {
        const MANIFEST: &str = include_str!("../../models/default/manifest.json");
        const WEIGHTS: &[u8] = include_bytes!("../../models/default/model.safetensors");
        Self::from_parts(
            Path::new("<built-in models/default>"),
            MANIFEST,
            WEIGHTS,
            device,
        )
    }

    /// Verifies a manifest and weights and builds the model; `dir` only labels errors.
    pub fn from_parts(
        dir: &Path,
        manifest_text: &str,
        bytes: &[u8],
        device: &Device,
    ) -> Result<Self, BundleError> {
        let mpath = dir.join(BUNDLE_MANIFEST);
        let wpath = dir.join(BUNDLE_WEIGHTS);
        let manifest: Manifest =
            serde_json::from_str(manifest_text).map_err(|source| BundleError::Manifest {
                path: mpath,
                source,
            })?;
        let mismatch = |reason: String| BundleError::Mismatch {
            path: dir.to_path_buf(),
            reason,
        };
        if manifest.format != MANIFEST_FORMAT {
            return Err(mismatch(format!(
                "manifest format {} (this build reads {MANIFEST_FORMAT})",
                manifest.format
            )));
        }
        let actual = sha256_hex(bytes);
        if actual != manifest.weights_sha256 {
            return Err(BundleError::Checksum {
                path: wpath,
                expected: manifest.weights_sha256.clone(),
                actual,
            });
        }
        manifest
            .spec
            .validate()
            .map_err(|e| mismatch(e.to_string()))?;
        let names = manifest.spec.feature_names();
        if names != manifest.scaler.names {
            return Err(mismatch(format!(
                "spec features {names:?} but scaler fitted on {:?}",
                manifest.scaler.names
            )));
        }
        let arch = &manifest.architecture;
        if arch.input != names.len() || arch.window != manifest.window {
            return Err(mismatch(format!(
                "architecture expects {} features x {} steps, spec gives {} x {}",
                arch.input,
                arch.window,
                names.len(),
                manifest.window
            )));
        }
        let weights_err = |source| BundleError::Weights {
            path: wpath.clone(),
            source,
        };
        let tensors = candle_core::safetensors::load_buffer(bytes, device).map_err(weights_err)?;
        let count: usize = tensors.values().map(Tensor::elem_count).sum();
        if count != arch.parameter_count() {
            return Err(mismatch(format!(
                "{count} weights stored, architecture has {}",
                arch.parameter_count()
            )));
        }
        let fast = FastModel::new(arch, &tensors).map_err(weights_err)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model = AttentionLstm::new(arch, vb).map_err(weights_err)?;
        Ok(Bundle {
            manifest,
            model,
            fast,
        })
    }

    /// Loads `dir`, or the built-in default model when None.
    pub fn load_or_default(dir: Option<&Path>, device: &Device) -> Result<Self, BundleError> {
        match dir {
            Some(d) => Self::load(d, device),
            None => Self::embedded_default(device),
        }
    }

    /// The window recipe (spec, scaler, length) this model was trained with.
    pub fn window_builder(&self) -> WindowBuilder {
        WindowBuilder::new(
            self.manifest.spec.clone(),
            self.manifest.scaler.clone(),
            self.manifest.window,
        )
    }

    /// The alert threshold.
    pub fn threshold(&self) -> f64 {
        self.manifest.threshold.value
    }
}
