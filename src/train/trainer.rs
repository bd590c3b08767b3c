//! The training loop: undersampled epochs, focal loss, Adam, validation average precision each
//! epoch, early stopping with restore-best.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::backprop::{Adam, Net, combine};
use super::dataset::{WindowSet, epoch_sample};
use super::loss::FocalLoss;
use super::metrics::average_precision;
use crate::model::{AttentionLstm, Batch, FastModel, ModelConfig, ThresholdRule, weights};

/// Training settings, recorded in the bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    /// Maximum epochs.
    pub epochs: usize,
    /// Windows per optimiser step.
    pub batch_size: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// The loss.
    pub loss: FocalLoss,
    /// Legitimate windows per fraud window in each epoch's sample; None trains on all.
    pub neg_per_pos: Option<f64>,
    /// Epochs without a better validation AP before stopping.
    pub patience: usize,
    /// Seed for initialisation, sampling, shuffling and dropout.
    pub seed: u64,
    /// Stop starting new epochs once this many seconds have passed (None: no limit).
    pub time_budget_s: Option<f64>,
    /// What computes the gradients (bundles written before it existed were trained by candle).
    #[serde(default = "Engine::candle")]
    pub engine: Engine,
}

/// What computes a training step's gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// The hand-written forward and backward passes on the scoring kernels ([`super::backprop`]).
    #[default]
    Kernels,
    /// Candle's autograd over the candle network (the oracle the kernels are tested against).
    Candle,
}

impl Engine {
    fn candle() -> Self {
        Engine::Candle
    }

    /// Its name as the `--engine` flag spells it.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Kernels => "kernels",
            Engine::Candle => "candle",
        }
    }
}

/// One epoch's record, kept in the manifest and plotted in the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss.
    pub loss: f64,
    /// Training windows seen.
    pub windows: usize,
    /// Training throughput.
    pub windows_per_s: f64,
    /// Validation average precision (early-stopping metric).
    pub valid_ap: f64,
    /// Validation precision at the rule's threshold for this epoch.
    pub valid_precision: f64,
    /// Validation recall at that threshold.
    pub valid_recall: f64,
    /// Wall time of the epoch including validation.
    pub seconds: f64,
}

/// The outcome of training.
#[derive(Debug, Clone)]
pub struct Trained {
    /// Per-epoch records.
    pub history: Vec<EpochRecord>,
    /// The epoch whose weights were kept (1-based).
    pub best_epoch: usize,
    /// The kept weights.
    pub weights: HashMap<String, Tensor>,
}

/// What the loop reports while it runs (progress bars live in the CLI).
pub trait TrainObserver {
    /// An epoch starts with this many windows.
    fn epoch_start(&mut self, epoch: usize, windows: usize);
    /// A batch finished; `loss` is the running mean.
    fn batch_done(&mut self, done: usize, loss: f64);
    /// An epoch finished and was validated.
    fn epoch_end(&mut self, record: &EpochRecord, improved: bool);
}

/// Trains `model` (whose variables are in `varmap`) on `train`, validating on `valid`.
pub fn fit(
    model: &AttentionLstm,
    varmap: &VarMap,
    train: &WindowSet,
    valid: &WindowSet,
    s: &TrainSettings,
    rule: ThresholdRule,
    observer: &mut dyn TrainObserver,
) -> candle_core::Result<Trained> {
    let cfg: &ModelConfig = model.config();
    let mut opt = Optimiser::new(model, varmap, s)?;
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed.wrapping_add(1));
    let began = Instant::now();
    let mut history = Vec::new();
    let mut best: Option<(f64, usize, HashMap<String, Tensor>)> = None;
    for epoch in 1..=s.epochs {
        let epoch_began = Instant::now();
        let idx = epoch_sample(&train.labels, s.neg_per_pos, &mut rng);
        observer.epoch_start(epoch, idx.len());
        let (mut loss_sum, mut batches) = (0.0, 0usize);
        for (b, chunk) in idx.chunks(s.batch_size).enumerate() {
            let seeds = [
                rand::RngExt::random::<u64>(&mut rng),
                rand::RngExt::random::<u64>(&mut rng),
            ];
            let loss = opt.step(train, chunk, &s.loss, seeds)?;
            loss_sum += loss;
            batches += 1;
            observer.batch_done(
                (b * s.batch_size + chunk.len()).min(idx.len()),
                loss_sum / batches as f64,
            );
        }
        let train_secs = epoch_began.elapsed().as_secs_f64();
        let snapshot = opt.weights()?;
        let fast = FastModel::new(cfg, &snapshot)?;
        let scores = valid.score(&fast, 512, |_| {});
        let ap = average_precision(&scores, &valid.labels);
        let choice = rule.choose(&scores, &valid.labels);
        let record = EpochRecord {
            epoch,
            loss: loss_sum / batches.max(1) as f64,
            windows: idx.len(),
            windows_per_s: idx.len() as f64 / train_secs.max(1e-9),
            valid_ap: ap,
            valid_precision: choice.precision,
            valid_recall: choice.recall,
            seconds: epoch_began.elapsed().as_secs_f64(),
        };
        let improved = best.as_ref().is_none_or(|(b, _, _)| ap > *b);
        observer.epoch_end(&record, improved);
        history.push(record);
        if improved {
            best = Some((ap, epoch, snapshot));
        }
        let best_epoch = best.as_ref().map_or(0, |b| b.1);
        if epoch - best_epoch >= s.patience {
            break;
        }
        if let Some(budget) = s.time_budget_s {
            let per_epoch = began.elapsed().as_secs_f64() / epoch as f64;
            if began.elapsed().as_secs_f64() + per_epoch > budget {
                break;
            }
        }
    }
    let (_, best_epoch, weights) = best.expect("at least one epoch ran");
    Ok(Trained {
        history,
        best_epoch,
        weights,
    })
}

/// Adam over a model's variables, with the gradients from the engine the settings name.
pub struct Optimiser<'a> {
    model: &'a AttentionLstm,
    varmap: &'a VarMap,
    engine: EngineState,
}

enum EngineState {
    Kernels(Box<Net>, Adam),
    Candle(AdamW),
}

impl<'a> Optimiser<'a> {
    /// Adam (no weight decay, Keras's betas and epsilon) at `s.lr` on `s.engine`, starting from
    /// the variables' current values.
    pub fn new(
        model: &'a AttentionLstm,
        varmap: &'a VarMap,
        s: &TrainSettings,
    ) -> candle_core::Result<Self> {
        let engine = match s.engine {
            Engine::Kernels => EngineState::Kernels(
                Box::new(Net::new(model.config(), &weights(varmap)?)?),
                Adam::new(s.lr),
            ),
            Engine::Candle => EngineState::Candle(AdamW::new(
                varmap.all_vars(),
                ParamsAdamW {
                    lr: s.lr,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-7,
                    // Adam, not AdamW: candle's default weight decay of 0.01 is not what the
                    // notebook used.
                    weight_decay: 0.0,
                },
            )?),
        };
        Ok(Optimiser {
            model,
            varmap,
            engine,
        })
    }

    /// One optimiser step on the windows `chunk` of `train` (dropout drawn from `seeds`, one per
    /// half). Returns the batch's mean loss.
    pub fn step(
        &mut self,
        train: &WindowSet,
        chunk: &[usize],
        loss_fn: &FocalLoss,
        seeds: [u64; 2],
    ) -> candle_core::Result<f64> {
        match &mut self.engine {
            EngineState::Kernels(net, adam) => {
                Ok(kernel_step(net, adam, train, chunk, loss_fn, seeds))
            }
            EngineState::Candle(opt) => {
                data_parallel_step(self.model, self.varmap, opt, train, chunk, loss_fn, seeds)
            }
        }
    }

    /// The current weights by name (a snapshot).
    pub fn weights(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        match &self.engine {
            EngineState::Kernels(net, _) => net.weights(),
            EngineState::Candle(_) => weights(self.varmap),
        }
    }
}

/// One optimiser step on `chunk` with the hand-written passes: two halves on the two cores (the
/// scoring pool's helper thread), gradients averaged by half size. Returns the batch's mean loss.
fn kernel_step(
    net: &mut Net,
    adam: &mut Adam,
    train: &WindowSet,
    chunk: &[usize],
    loss_fn: &FocalLoss,
    seeds: [u64; 2],
) -> f64 {
    let half = chunk.len().div_ceil(2);
    let (a, b) = chunk.split_at(half.min(chunk.len()));
    let net_ref = &*net;
    let run = |part: &[usize], seed: u64| {
        if part.is_empty() {
            return None;
        }
        let (ws, lens, y) = train.batch(part);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Some(net_ref.loss_and_gradients(&ws, &lens, &y, loss_fn, Some(&mut rng)))
    };
    let (ra, rb) = crate::model::join(|| run(a, seeds[0]), || run(b, seeds[1]));
    let total = chunk.len() as f64;
    let (la, ga) = ra.expect("a step has at least one window");
    let (loss, grads) = match rb {
        Some((lb, gb)) => {
            let (wa, wb) = (a.len() as f64 / total, b.len() as f64 / total);
            (la * wa + lb * wb, combine(ga, wa as f32, &gb, wb as f32))
        }
        None => (la, ga),
    };
    adam.step(net, &grads);
    loss
}

/// One optimiser step on `chunk`, computed as two halves on two threads (candle's CPU ops barely
/// use a second core for these small matrices), with gradients averaged by half size: the same
/// update as one pass over the whole batch. Returns the batch's mean loss.
fn data_parallel_step(
    model: &AttentionLstm,
    varmap: &VarMap,
    opt: &mut AdamW,
    train: &WindowSet,
    chunk: &[usize],
    loss_fn: &FocalLoss,
    seeds: [u64; 2],
) -> candle_core::Result<f64> {
    let cfg = model.config();
    let half = chunk.len().div_ceil(2);
    let parts: Vec<&[usize]> = chunk.chunks(half).collect();
    let results: Vec<candle_core::Result<(GradStore, f32, usize)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .iter()
            .zip(seeds)
            .map(|(part, seed)| {
                scope.spawn(move || -> candle_core::Result<(GradStore, f32, usize)> {
                    let (ws, lens, y) = train.batch(part);
                    let batch = Batch::new(&ws, &lens, cfg.window, cfg.input, &Device::Cpu)?;
                    let mut rng = ChaCha8Rng::seed_from_u64(seed);
                    let out = model.forward(&batch, Some(&mut rng))?;
                    let targets = Tensor::from_vec(y, part.len(), &Device::Cpu)?;
                    let loss = loss_fn.forward(&out.logits, &targets)?;
                    Ok((loss.backward()?, loss.to_scalar::<f32>()?, part.len()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("training thread panicked"))
            .collect()
    });
    let mut results = results
        .into_iter()
        .collect::<candle_core::Result<Vec<_>>>()?;
    let total = chunk.len() as f64;
    let loss = results
        .iter()
        .map(|(_, l, n)| f64::from(*l) * *n as f64)
        .sum::<f64>()
        / total;
    let (mut grads, _, n0) = results.remove(0);
    if let Some((other, _, n1)) = results.pop() {
        let (w0, w1) = (n0 as f64 / total, n1 as f64 / total);
        for var in varmap.all_vars() {
            let combined = match (grads.get(&var), other.get(&var)) {
                (Some(a), Some(b)) => Some(((a * w0)? + (b * w1)?)?),
                (Some(a), None) => Some((a * w0)?),
                (None, Some(b)) => Some((b * w1)?),
                (None, None) => None,
            };
            if let Some(g) = combined {
                grads.insert(&var, g);
            }
        }
    }
    opt.step(&grads)?;
    Ok(loss)
}
