//! The network's sizes.

use serde::{Deserialize, Serialize};

/// Layer sizes of the attention-LSTM; stored in the bundle's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Features per transaction (the spec's width).
    pub input: usize,
    /// Transactions per window.
    pub window: usize,
    /// Units of each direction of the bidirectional LSTM.
    pub lstm1: usize,
    /// Width of the query, key and value projections.
    pub attention: usize,
    /// Units of the second LSTM.
    pub lstm2: usize,
    /// Units of the dense layer before the output.
    pub dense: usize,
    /// Dropout after the bidirectional LSTM, in training only.
    pub dropout: f32,
}

impl ModelConfig {
    /// The original notebook's sizes: BiLSTM 128, attention 64, LSTM 64, dense 32, dropout 0.2.
    pub fn notebook(input: usize, window: usize) -> Self {
        ModelConfig {
            input,
            window,
            lstm1: 128,
            attention: 64,
            lstm2: 64,
            dense: 32,
            dropout: 0.2,
        }
    }

    /// Width of the bidirectional LSTM's output (both directions).
    pub fn seq_width(&self) -> usize {
        2 * self.lstm1
    }

    /// Trainable parameters, counted as Keras counts them (one bias vector per LSTM).
    pub fn parameter_count(&self) -> usize {
        let lstm = |i: usize, h: usize| 4 * (h * (i + h) + h);
        let dense = |i: usize, o: usize| i * o + o;
        2 * lstm(self.input, self.lstm1)
            + 3 * dense(self.seq_width(), self.attention)
            + lstm(self.seq_width() + self.attention, self.lstm2)
            + dense(self.lstm2, self.dense)
            + dense(self.dense, 1)
    }

    /// Floating-point operations (a multiply-add is two) of one full window's forward pass:
    /// the matrix products and the attention's dot products (activations not counted). The
    /// notebook's architecture with 30 features and window 30: 18.8 million.
    pub fn flops_per_window(&self) -> usize {
        let t = self.window;
        let lstm = |i: usize, h: usize| 2 * t * (i * 4 * h + h * 4 * h);
        let (s, a) = (self.seq_width(), self.attention);
        2 * lstm(self.input, self.lstm1)
            + 3 * 2 * t * s * a
            + 2 * 2 * t * t * a
            + lstm(s + a, self.lstm2)
            + 2 * self.lstm2 * self.dense
            + 2 * self.dense
    }
}
