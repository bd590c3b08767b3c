//! The attention-LSTM (one struct per layer), its initialisation, and the model bundle.

pub mod bf16;
mod bundle;
mod config;
mod fast;
pub mod int8;
pub mod kernel;
mod layers;
mod network;
mod pool;
mod threshold;

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use bundle::{
    BUNDLE_MANIFEST, BUNDLE_WEIGHTS, Bundle, BundleError, MANIFEST_FORMAT, Manifest, ThresholdInfo,
};
pub use config::ModelConfig;
pub use fast::{FastModel, ForwardPath, Precision, precision, set_precision};
pub use layers::{Attention, Dense, Lstm};
pub use network::{AttentionLstm, Batch, Output};
pub(crate) use pool::join;
pub use threshold::{Choice, ThresholdRule};

/// A freshly initialised, trainable model and the variables an optimiser updates.
pub fn init(cfg: &ModelConfig, seed: u64, device: &Device) -> Result<(AttentionLstm, VarMap)> {
    let varmap = VarMap::new();
    let model = AttentionLstm::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    reinit(&varmap, seed)?;
    Ok((model, varmap))
}

/// The variables as named tensors (a snapshot: later optimiser steps do not change it).
pub fn weights(varmap: &VarMap) -> Result<HashMap<String, Tensor>> {
    let data = varmap.data().lock().expect("varmap lock");
    data.iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
        .collect()
}

/// Sets every variable from a seeded RNG (candle's CPU RNG cannot be seeded): Glorot-uniform
/// kernels, zero biases, and a forget-gate bias of 1 in every LSTM, as Keras initialises them.
fn reinit(varmap: &VarMap, seed: u64) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let values: Vec<f32> = if name.ends_with("bias") {
            let mut b = vec![0f32; dims[0]];
            if name.contains("lstm") {
                let h = dims[0] / 4;
                b[h..2 * h].fill(1.0);
            }
            b
        } else {
            let limit = (6.0 / (dims[0] + dims[1]) as f64).sqrt() as f32;
            (0..dims[0] * dims[1])
                .map(|_| rng.random_range(-limit..limit))
                .collect()
        };
        var.set(&Tensor::from_vec(values, dims.as_slice(), var.device())?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notebook_flops_per_window_for_30_features() {
        let flops = ModelConfig::notebook(30, 30).flops_per_window();
        assert!((18_700_000..18_900_000).contains(&flops), "{flops}");
        // Half the window, about half the work (the attention's T² part is small).
        let half = ModelConfig::notebook(30, 15).flops_per_window();
        assert!(
            half * 2 < flops && half * 2 > flops * 95 / 100,
            "{half} vs {flops}"
        );
    }

    #[test]
    fn notebook_parameter_count_for_30_features() {
        let cfg = ModelConfig::notebook(30, 30);
        assert_eq!(cfg.parameter_count(), 312_833);
        let (_, varmap) = init(&cfg, 1, &Device::Cpu).unwrap();
        let counted: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
        assert_eq!(counted, 312_833);
    }

    fn score(model: &AttentionLstm, row: &[f32], window: usize, width: usize) -> f32 {
        let mut padded = vec![0f32; window * width];
        padded[(window - 1) * width..].copy_from_slice(row);
        let batch = Batch::new(&[&padded], &[1], window, width, &Device::Cpu).unwrap();
        model.predict(&batch).unwrap().0[0]
    }

    #[test]
    fn padding_is_masked() {
        let cfg = ModelConfig::notebook(5, 30);
        let (model, _) = init(&cfg, 3, &Device::Cpu).unwrap();
        let row = [0.3f32, -1.2, 0.5, 0.8, 2.0];
        let padded = score(&model, &row, 30, 5);
        let alone = score(&model, &row, 1, 5);
        assert_eq!(padded, alone);
        // Padding values themselves are ignored too, not just assumed to be zero.
        let mut noisy = vec![7f32; 30 * 5];
        noisy[29 * 5..].copy_from_slice(&row);
        let batch = Batch::new(&[&noisy], &[1], 30, 5, &Device::Cpu).unwrap();
        let (s, att) = model.predict(&batch).unwrap();
        assert_eq!(s[0], alone);
        assert_eq!(att[0][..29], [0.0; 29]);
        assert!((att[0][29] - 1.0).abs() < 1e-6);
    }

    /// The plain-Rust scoring path gives the candle network's scores and attention.
    #[test]
    fn fast_forward_matches_candle() {
        let cfg = ModelConfig::notebook(5, 12);
        let (model, varmap) = init(&cfg, 5, &Device::Cpu).unwrap();
        let fast = FastModel::new(&cfg, &weights(&varmap).unwrap()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let lens: Vec<usize> = (0..9).map(|i| [12, 1, 5, 12, 11, 2, 12, 7, 3][i]).collect();
        let data: Vec<Vec<f32>> = lens
            .iter()
            .map(|&l| {
                let mut w: Vec<f32> = (0..12 * 5).map(|_| rng.random_range(-2.0..2.0)).collect();
                w[..(12 - l) * 5].fill(0.0);
                w
            })
            .collect();
        let ws: Vec<&[f32]> = data.iter().map(Vec::as_slice).collect();
        let batch = Batch::new(&ws, &lens, 12, 5, &Device::Cpu).unwrap();
        let (s_ref, a_ref) = model.predict(&batch).unwrap();
        let (s, a) = fast.predict(&ws, &lens);
        for i in 0..lens.len() {
            assert!(
                (s[i] - s_ref[i]).abs() < 1e-5,
                "score {i}: {} vs {}",
                s[i],
                s_ref[i]
            );
            for t in 0..12 {
                assert!((a[i][t] - a_ref[i][t]).abs() < 1e-5, "attention {i},{t}");
            }
        }
    }

    /// Random windows (values in -3..3) left-padded with zeros to their lengths `lens`.
    fn padded_windows(
        rng: &mut ChaCha8Rng,
        lens: &[usize],
        window: usize,
        width: usize,
    ) -> Vec<Vec<f32>> {
        lens.iter()
            .map(|&l| {
                let mut w: Vec<f32> = (0..window * width)
                    .map(|_| rng.random_range(-3.0..3.0))
                    .collect();
                w[..(window - l) * width].fill(0.0);
                w
            })
            .collect()
    }

    /// The kernels (this CPU's best instruction set) against the reference forward and the
    /// candle network: the notebook's architecture with random weights, random windows of every
    /// padding length 1..=30, one at a time (batch 1) and all together (a batch split over two
    /// threads and in sub-batches, each layer one fused product and cell a step on AVX-512),
    /// scores and attention within 1e-5.
    #[test]
    fn the_kernels_score_like_the_reference_and_candle_at_every_padding_length() {
        let (window, width) = (30, 30);
        let cfg = ModelConfig::notebook(width, window);
        let (model, varmap) = init(&cfg, 11, &Device::Cpu).unwrap();
        let fast = FastModel::new(&cfg, &weights(&varmap).unwrap()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        // Every length three times: the batch (90 + 4) is split over two threads, and each
        // thread's 47 windows into sub-batches of 24 and 23.
        let lens: Vec<usize> = (1..=window)
            .chain(1..=window)
            .chain(1..=window)
            .chain([30, 1, 17, 30])
            .collect();
        let data = padded_windows(&mut rng, &lens, window, width);
        let ws: Vec<&[f32]> = data.iter().map(Vec::as_slice).collect();
        let batch = Batch::new(&ws, &lens, window, width, &Device::Cpu).unwrap();
        let (s_candle, a_candle) = model.predict(&batch).unwrap();
        let (s_ref, a_ref) = fast.predict_on(&ws, &lens, ForwardPath::Reference);
        let close = |x: f32, y: f32| (x - y).abs() < 1e-5;
        for isa in kernel::Isa::all_available() {
            let path = ForwardPath::Kernel(isa);
            let (s_all, a_all) = fast.predict_on(&ws, &lens, path);
            for i in 0..lens.len() {
                let (s_one, a_one) = fast.predict_on(&ws[i..=i], &lens[i..=i], path);
                let both = [("batch", s_all[i], &a_all[i]), ("one", s_one[0], &a_one[0])];
                for (name, s, a) in both {
                    assert!(
                        close(s, s_ref[i]) && close(s, s_candle[i]),
                        "{} {name} {i} (length {}): kernel {s}, reference {}, candle {}",
                        isa.name(),
                        lens[i],
                        s_ref[i],
                        s_candle[i]
                    );
                    for t in 0..window {
                        assert!(
                            close(a[t], a_ref[i][t]) && close(a[t], a_candle[i][t]),
                            "{} {name} {i} attention {t}",
                            isa.name()
                        );
                    }
                }
            }
        }
    }

    /// A reduced-precision path against the f32 reference: the notebook's architecture,
    /// random weights, every padding length, at batch 1 and 64; returns the largest score
    /// difference (attention weights within `bound` too).
    fn reduced_precision_difference(path: ForwardPath, bound: f32) -> f32 {
        let (window, width) = (30, 30);
        let cfg = ModelConfig::notebook(width, window);
        let (_, varmap) = init(&cfg, 13, &Device::Cpu).unwrap();
        let fast = FastModel::new(&cfg, &weights(&varmap).unwrap()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(14);
        let lens: Vec<usize> = (1..=window).chain(1..=window).chain([30; 4]).collect();
        let data = padded_windows(&mut rng, &lens, window, width);
        let ws: Vec<&[f32]> = data.iter().map(Vec::as_slice).collect();
        let (s_ref, a_ref) = fast.predict_on(&ws, &lens, ForwardPath::Reference);
        let (s_all, a_all) = fast.predict_on(&ws, &lens, path);
        let mut worst = 0f32;
        for i in 0..lens.len() {
            let (s_one, _) = fast.predict_on(&ws[i..=i], &lens[i..=i], path);
            for s in [s_all[i], s_one[0]] {
                worst = worst.max((s - s_ref[i]).abs());
            }
            for t in 0..window {
                assert!(
                    (a_all[i][t] - a_ref[i][t]).abs() < bound,
                    "{path:?}: attention {i},{t}"
                );
            }
        }
        assert!(worst < bound, "{path:?}: largest score difference {worst}");
        assert!(worst > 0.0, "{path:?} should round something");
        worst
    }

    /// The bf16 path (where the CPU has AVX512_BF16): rounding weights and activations to 8
    /// mantissa bits moves scores by about 1e-3; the bound is 2e-2.
    #[test]
    fn the_bf16_path_scores_close_to_f32() {
        if !bf16::available() {
            eprintln!("AVX512_BF16 not on this CPU: the bf16 path cannot run here");
            return;
        }
        reduced_precision_difference(ForwardPath::Bf16, 2e-2);
    }

    /// The int8 path (where the CPU has AVX-512 BW): steps of 1/127 of each row's and 1/127
    /// (VNNI) or 1/63 of each column's largest value; the bound is 2e-2.
    #[test]
    fn the_int8_path_scores_close_to_f32() {
        if !int8::available() {
            eprintln!("no AVX-512 BW on this CPU: the int8 path cannot run here");
            return;
        }
        let worst = reduced_precision_difference(ForwardPath::Int8, 2e-2);
        eprintln!("int8: largest score difference {worst}");
    }

    /// Large batches are split over two threads and in sub-batches, on the fused LSTM step: the
    /// same scores, bit for bit, as one window at a time (the separate products and cell).
    #[test]
    fn split_batches_score_like_single_windows() {
        let cfg = ModelConfig::notebook(5, 6);
        let (_, varmap) = init(&cfg, 8, &Device::Cpu).unwrap();
        let fast = FastModel::new(&cfg, &weights(&varmap).unwrap()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let data: Vec<Vec<f32>> = (0..101)
            .map(|_| (0..6 * 5).map(|_| rng.random_range(-2.0..2.0)).collect())
            .collect();
        let lens: Vec<usize> = (0..101).map(|i| 1 + i % 6).collect();
        let ws: Vec<&[f32]> = data.iter().map(Vec::as_slice).collect();
        let (all, att) = fast.predict(&ws, &lens);
        assert_eq!(all.len(), 101);
        for i in 0..101 {
            let (one, one_att) = fast.predict(&ws[i..=i], &lens[i..=i]);
            // Bit for bit: a window's score must not depend on its batch (two detectors
            // sharing a group are compared with one alone to 1e-6, and a random-weight model's
            // unscaled attention amplifies rounding differences past that).
            assert_eq!(all[i].to_bits(), one[0].to_bits(), "window {i}");
            assert_eq!(att[i].len(), one_att[0].len());
        }
    }

    #[test]
    fn same_seed_same_weights() {
        let cfg = ModelConfig::notebook(5, 4);
        let row = [0.1f32, 0.2, 0.3, 0.4, 0.5];
        let a = score(&init(&cfg, 9, &Device::Cpu).unwrap().0, &row, 4, 5);
        let b = score(&init(&cfg, 9, &Device::Cpu).unwrap().0, &row, 4, 5);
        let c = score(&init(&cfg, 10, &Device::Cpu).unwrap().0, &row, 4, 5);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
