//! The attention-LSTM: BiLSTM -> dropout -> self-attention -> concat -> LSTM -> dense -> sigmoid.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use super::config::ModelConfig;
use super::layers::{Attention, Dense, Lstm, StepMask};

/// Score added to padded key positions before the softmax: exp() of it is exactly 0.
const MASKED: f32 = -1e9;

/// A batch of windows laid out for the network: one `[B, F]` tensor per time step.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Inputs per step, oldest first.
    pub steps: Vec<Tensor>,
    /// Padding masks per step (None where every window is real).
    pub masks: Vec<StepMask>,
    /// `[B, 1, T]`: 0 on real positions, a large negative number on padding; None if no padding.
    pub key_bias: Option<Tensor>,
    /// Windows in the batch.
    pub size: usize,
}

impl Batch {
    /// Builds a batch from windows of `window * width` floats (left-padded, as
    /// [`crate::features::Window::write_padded`] writes them) and their real lengths.
    pub fn new(
        windows: &[&[f32]],
        lens: &[usize],
        window: usize,
        width: usize,
        device: &Device,
    ) -> Result<Self> {
        let b = windows.len();
        let mut steps = Vec::with_capacity(window);
        let mut masks = Vec::with_capacity(window);
        let mut buf = vec![0f32; b * width];
        for t in 0..window {
            for (i, w) in windows.iter().enumerate() {
                buf[i * width..(i + 1) * width].copy_from_slice(&w[t * width..(t + 1) * width]);
            }
            steps.push(Tensor::from_slice(&buf, (b, width), device)?);
            let keep: Vec<f32> = lens
                .iter()
                .map(|&l| if t + l >= window { 1.0 } else { 0.0 })
                .collect();
            masks.push(if keep.iter().all(|&k| k == 1.0) {
                None
            } else {
                let drop: Vec<f32> = keep.iter().map(|k| 1.0 - k).collect();
                Some((
                    Tensor::from_vec(keep, (b, 1), device)?,
                    Tensor::from_vec(drop, (b, 1), device)?,
                ))
            });
        }
        let key_bias = if lens.iter().all(|&l| l >= window) {
            None
        } else {
            let bias: Vec<f32> = lens
                .iter()
                .flat_map(|&l| (0..window).map(move |t| if t + l >= window { 0.0 } else { MASKED }))
                .collect();
            Some(Tensor::from_vec(bias, (b, 1, window), device)?)
        };
        Ok(Batch {
            steps,
            masks,
            key_bias,
            size: b,
        })
    }
}

/// What the network returns for a batch.
#[derive(Debug, Clone)]
pub struct Output {
    /// Pre-sigmoid scores `[B]`.
    pub logits: Tensor,
    /// The current transaction's attention weights over the window `[B, T]`.
    pub attention: Tensor,
}

/// The attention-LSTM.
#[derive(Debug, Clone)]
pub struct AttentionLstm {
    cfg: ModelConfig,
    forward_lstm: Lstm,
    backward_lstm: Lstm,
    attention: Attention,
    lstm2: Lstm,
    dense: Dense,
    out: Dense,
}

impl AttentionLstm {
    /// Creates or loads every layer under `vb`.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let seq = cfg.seq_width();
        Ok(AttentionLstm {
            cfg: cfg.clone(),
            forward_lstm: Lstm::new(cfg.input, cfg.lstm1, vb.pp("bilstm_forward"))?,
            backward_lstm: Lstm::new(cfg.input, cfg.lstm1, vb.pp("bilstm_backward"))?,
            attention: Attention::new(seq, cfg.attention, vb.pp("attention"))?,
            lstm2: Lstm::new(seq + cfg.attention, cfg.lstm2, vb.pp("lstm2"))?,
            dense: Dense::new(cfg.lstm2, cfg.dense, vb.pp("dense"))?,
            out: Dense::new(cfg.dense, 1, vb.pp("output"))?,
        })
    }

    /// The sizes.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Scores a batch. `dropout` carries the training RNG; None is inference.
    pub fn forward(&self, batch: &Batch, dropout: Option<&mut ChaCha8Rng>) -> Result<Output> {
        let fwd = self
            .forward_lstm
            .forward(&batch.steps, &batch.masks, false)?;
        // Keras's Bidirectional: the backward layer reads the sequence reversed, and its outputs
        // are re-aligned to the original order before concatenation.
        let bwd = self
            .backward_lstm
            .forward(&batch.steps, &batch.masks, true)?;
        let mut seq = Vec::with_capacity(fwd.len());
        for (f, b) in fwd.iter().zip(&bwd) {
            seq.push(Tensor::cat(&[f, b], 1)?);
        }
        if let Some(rng) = dropout {
            seq = seq
                .iter()
                .map(|s| self.dropout(s, rng))
                .collect::<Result<_>>()?;
        }
        let (att, weights) = self.attention.forward(&seq, batch.key_bias.as_ref())?;
        let joined = seq
            .iter()
            .zip(&att)
            .map(|(s, a)| Tensor::cat(&[s, a], 1))
            .collect::<Result<Vec<_>>>()?;
        let states = self.lstm2.forward(&joined, &batch.masks, false)?;
        let last = states.last().expect("window has steps");
        let hidden = self.dense.forward(last)?.relu()?;
        let logits = self.out.forward(&hidden)?.squeeze(1)?;
        Ok(Output {
            logits,
            attention: weights,
        })
    }

    /// Inverted dropout with the training RNG, so a seed reproduces a run.
    fn dropout(&self, xs: &Tensor, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        let p = self.cfg.dropout;
        if p <= 0.0 {
            return Ok(xs.clone());
        }
        let scale = 1.0 / (1.0 - p);
        let mask: Vec<f32> = (0..xs.elem_count())
            .map(|_| if rng.random::<f32>() < p { 0.0 } else { scale })
            .collect();
        xs.mul(&Tensor::from_vec(mask, xs.shape(), xs.device())?)
    }

    /// Scores `[B]` in (0, 1) and attention `[B, T]` as host vectors.
    pub fn predict(&self, batch: &Batch) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        let out = self.forward(batch, None)?;
        let scores = candle_nn::ops::sigmoid(&out.logits)?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        Ok((scores, out.attention.to_vec2()?))
    }
}
