//! The layers, one struct each, in Keras's weight layout (`kernel` is `[in, out]`).

use candle_core::{D, Result, Tensor};
use candle_nn::VarBuilder;

/// A fully connected layer `x · kernel + bias`.
#[derive(Debug, Clone)]
pub struct Dense {
    kernel: Tensor,
    bias: Tensor,
}

impl Dense {
    /// Loads or creates `kernel [input, output]` and `bias [output]` under `vb`.
    pub fn new(input: usize, output: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Dense {
            kernel: vb.get((input, output), "kernel")?,
            bias: vb.get(output, "bias")?,
        })
    }

    /// Applies the layer to `[B, input]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        xs.matmul(&self.kernel)?.broadcast_add(&self.bias)
    }

    /// Applies the layer to `[B, T, input]`.
    pub fn forward_seq(&self, xs: &Tensor) -> Result<Tensor> {
        xs.broadcast_matmul(&self.kernel)?.broadcast_add(&self.bias)
    }
}

/// Per-step padding mask: `(keep, 1 - keep)`, each `[B, 1]`; None when every row is real.
pub type StepMask = Option<(Tensor, Tensor)>;

/// An LSTM with Keras's gate order (input, forget, cell, output) and a single bias vector.
///
/// Steps are separate `[B, input]` tensors rather than slices of one `[B, T, input]` tensor:
/// backpropagating through a per-step `narrow` costs O(T²), through a list costs O(T).
#[derive(Debug, Clone)]
pub struct Lstm {
    kernel: Tensor,
    recurrent: Tensor,
    bias: Tensor,
    hidden: usize,
}

impl Lstm {
    /// Loads or creates `kernel [input, 4H]`, `recurrent_kernel [H, 4H]`, `bias [4H]`.
    pub fn new(input: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Lstm {
            kernel: vb.get((input, 4 * hidden), "kernel")?,
            recurrent: vb.get((hidden, 4 * hidden), "recurrent_kernel")?,
            bias: vb.get(4 * hidden, "bias")?,
            hidden,
        })
    }

    /// Runs over `steps` (forwards, or backwards when `reverse`) and returns the hidden state at
    /// every step, in the original time order. On a padded step the state is carried through
    /// unchanged, so left padding leaves the real steps exactly as without it.
    pub fn forward(
        &self,
        steps: &[Tensor],
        masks: &[StepMask],
        reverse: bool,
    ) -> Result<Vec<Tensor>> {
        let b = steps[0].dim(0)?;
        let mut h = Tensor::zeros((b, self.hidden), steps[0].dtype(), steps[0].device())?;
        let mut c = h.clone();
        let mut outs = vec![h.clone(); steps.len()];
        let order: Vec<usize> = if reverse {
            (0..steps.len()).rev().collect()
        } else {
            (0..steps.len()).collect()
        };
        for t in order {
            let gates = steps[t]
                .matmul(&self.kernel)?
                .add(&h.matmul(&self.recurrent)?)?
                .broadcast_add(&self.bias)?;
            let g = gates.chunk(4, D::Minus1)?;
            let i = candle_nn::ops::sigmoid(&g[0])?;
            let f = candle_nn::ops::sigmoid(&g[1])?;
            let cell = g[2].tanh()?;
            let o = candle_nn::ops::sigmoid(&g[3])?;
            let c_new = f.mul(&c)?.add(&i.mul(&cell)?)?;
            let h_new = o.mul(&c_new.tanh()?)?;
            (h, c) = match &masks[t] {
                None => (h_new, c_new),
                // new·keep + old·(1-keep): exact for keep in {0, 1}.
                Some((keep, drop)) => (
                    h_new.broadcast_mul(keep)?.add(&h.broadcast_mul(drop)?)?,
                    c_new.broadcast_mul(keep)?.add(&c.broadcast_mul(drop)?)?,
                ),
            };
            outs[t] = h.clone();
        }
        Ok(outs)
    }
}

/// Keras-style dot-product attention (no scaling) with Dense query, key and value projections.
#[derive(Debug, Clone)]
pub struct Attention {
    query: Dense,
    key: Dense,
    value: Dense,
}

impl Attention {
    /// Three `Dense(input -> width)` projections.
    pub fn new(input: usize, width: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Attention {
            query: Dense::new(input, width, vb.pp("query"))?,
            key: Dense::new(input, width, vb.pp("key"))?,
            value: Dense::new(input, width, vb.pp("value"))?,
        })
    }

    /// For each step's vector in `steps` (each `[B, input]`), attends over all steps:
    /// `softmax(q·Kᵀ + key_bias)·V`. `key_bias` is `[B, 1, T]`, a large negative number on padded
    /// positions, so they get exactly zero weight. Returns the per-step outputs `[B, width]` and
    /// the last step's attention weights `[B, T]` (why the current transaction scored as it did).
    pub fn forward(
        &self,
        steps: &[Tensor],
        key_bias: Option<&Tensor>,
    ) -> Result<(Vec<Tensor>, Tensor)> {
        let seq = Tensor::stack(steps, 1)?;
        let keys_t = self.key.forward_seq(&seq)?.transpose(1, 2)?.contiguous()?;
        let values = self.value.forward_seq(&seq)?;
        let mut outs = Vec::with_capacity(steps.len());
        let mut last = None;
        for step in steps {
            let q = self.query.forward(step)?.unsqueeze(1)?;
            let mut scores = q.matmul(&keys_t)?;
            if let Some(bias) = key_bias {
                scores = scores.add(bias)?;
            }
            let weights = candle_nn::ops::softmax(&scores, D::Minus1)?;
            outs.push(weights.matmul(&values)?.squeeze(1)?);
            last = Some(weights);
        }
        let last = last.expect("at least one step").squeeze(1)?;
        Ok((outs, last))
    }
}
