//! A plain-Rust forward pass of the attention-LSTM for scoring (evaluation and serving).
//!
//! Candle's autograd-capable ops are what training needs, but for inference they spend most of
//! their time allocating per-op tensors and in glibc's `tanhf`. This path runs the same network
//! with whole-sequence input projections (one GEMM per layer), preallocated buffers and
//! exp-based activations; a test pins it to the candle network within 1e-5.
//!
//! Two paths share the network's structure: [`ForwardPath::Kernel`] (what scoring uses) runs every
//! matrix product on weights packed once ([`super::kernel`]) and fuses each LSTM step's gate
//! activations; [`ForwardPath::Reference`] runs a general GEMM and scalar activations, kept as the
//! oracle the kernels are tested against.

use std::collections::HashMap;

use candle_core::Tensor;

use super::config::ModelConfig;
use super::kernel::{self, Isa, Packed};

/// Which implementation of the forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardPath {
    /// Packed weights, fused LSTM cells, vectorised activations (see [`super::kernel`]), on
    /// this instruction set.
    Kernel(Isa),
    /// A general GEMM (`matrixmultiply`) and scalar activations: the oracle.
    Reference,
}

/// `c = a·b + beta·c` for row-major `a [m,k]`, `b [k,n]`, `c [m,n]`.
fn gemm(a: &[f32], b: &[f32], c: &mut [f32], (m, k, n): (usize, usize, usize), beta: f32) {
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "gemm shapes"
    );
    // SAFETY: the asserts above keep every access of the row-major strides inside the slices.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[inline]
fn tanh(x: f32) -> f32 {
    // tanh(x) = 2·sigmoid(2x) − 1, clamped so exp() never overflows.
    let x = x.clamp(-15.0, 15.0);
    2.0 / (1.0 + (-2.0 * x).exp()) - 1.0
}

#[derive(Debug, Clone)]
struct DenseW {
    kernel: Vec<f32>,
    packed: Packed,
    bias: Vec<f32>,
    input: usize,
    output: usize,
}

impl DenseW {
    fn new(kernel: Vec<f32>, bias: Vec<f32>, input: usize, output: usize) -> Self {
        let packed = Packed::new(&kernel, input, output);
        DenseW {
            kernel,
            packed,
            bias,
            input,
            output,
        }
    }

    /// `out [rows, output] = x [rows, input] · kernel + bias`.
    fn apply(&self, x: &[f32], rows: usize, out: &mut [f32], path: ForwardPath) {
        for r in 0..rows {
            out[r * self.output..(r + 1) * self.output].copy_from_slice(&self.bias);
        }
        match path {
            ForwardPath::Kernel(isa) => {
                kernel::matmul_acc(isa, x, rows, self.input, &self.packed, out)
            }
            ForwardPath::Reference => {
                gemm(x, &self.kernel, out, (rows, self.input, self.output), 1.0)
            }
        }
    }
}

#[derive(Debug, Clone)]
struct LstmW {
    input_w: DenseW,
    recurrent: Vec<f32>,
    recurrent_packed: Packed,
    hidden: usize,
}

impl LstmW {
    /// Runs over time-major input `xs [T, B, input]` and writes every step's hidden state into
    /// `hs [T, B, hidden]`. `keep(t, b)` says whether step t of window b is real; on padding the
    /// state carries over unchanged.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        xs: &[f32],
        t_len: usize,
        b: usize,
        reverse: bool,
        keep: &dyn Fn(usize, usize) -> bool,
        hs: &mut [f32],
        path: ForwardPath,
    ) {
        let (h4, hd) = (4 * self.hidden, self.hidden);
        // Input projections of every step at once.
        let mut gx = vec![0f32; t_len * b * h4];
        self.input_w.apply(xs, t_len * b, &mut gx, path);
        let mut h = vec![0f32; b * hd];
        let mut c = vec![0f32; b * hd];
        let mut g = vec![0f32; b * h4];
        for step in 0..t_len {
            let t = if reverse { t_len - 1 - step } else { step };
            if !(0..b).any(|i| keep(t, i)) {
                // Padding in every window: the state carries over.
                hs[t * b * hd..(t + 1) * b * hd].copy_from_slice(&h);
                continue;
            }
            g.copy_from_slice(&gx[t * b * h4..(t + 1) * b * h4]);
            match path {
                ForwardPath::Kernel(isa) => {
                    kernel::matmul_acc(isa, &h, b, hd, &self.recurrent_packed, &mut g)
                }
                ForwardPath::Reference => gemm(&h, &self.recurrent, &mut g, (b, hd, h4), 1.0),
            }
            for i in 0..b {
                if !keep(t, i) {
                    continue;
                }
                let gi = &g[i * h4..(i + 1) * h4];
                let (hi, ci) = (&mut h[i * hd..(i + 1) * hd], &mut c[i * hd..(i + 1) * hd]);
                match path {
                    ForwardPath::Kernel(isa) => kernel::lstm_cell(isa, gi, ci, hi),
                    ForwardPath::Reference => {
                        for j in 0..hd {
                            let ig = sigmoid(gi[j]);
                            let fg = sigmoid(gi[hd + j]);
                            let cg = tanh(gi[2 * hd + j]);
                            let og = sigmoid(gi[3 * hd + j]);
                            ci[j] = fg * ci[j] + ig * cg;
                            hi[j] = og * tanh(ci[j]);
                        }
                    }
                }
            }
            hs[t * b * hd..(t + 1) * b * hd].copy_from_slice(&h);
        }
    }
}

/// The attention-LSTM's weights as plain vectors, for fast batched scoring.
#[derive(Debug, Clone)]
pub struct FastModel {
    cfg: ModelConfig,
    forward: LstmW,
    backward: LstmW,
    query: DenseW,
    key: DenseW,
    value: DenseW,
    lstm2: LstmW,
    dense: DenseW,
    out: DenseW,
}

fn take(t: &HashMap<String, Tensor>, name: &str) -> candle_core::Result<Vec<f32>> {
    t.get(name)
        .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor {name}")))?
        .flatten_all()?
        .to_vec1()
}

impl FastModel {
    /// Copies the named weights (as saved in a bundle) into plain vectors.
    pub fn new(cfg: &ModelConfig, w: &HashMap<String, Tensor>) -> candle_core::Result<Self> {
        let dense = |p: &str, input: usize, output: usize| -> candle_core::Result<DenseW> {
            let (kernel, bias) = (
                take(w, &format!("{p}.kernel"))?,
                take(w, &format!("{p}.bias"))?,
            );
            if kernel.len() != input * output || bias.len() != output {
                return Err(candle_core::Error::Msg(format!("tensor {p}: wrong shape")));
            }
            Ok(DenseW::new(kernel, bias, input, output))
        };
        let lstm = |p: &str, input: usize, hidden: usize| -> candle_core::Result<LstmW> {
            let recurrent = take(w, &format!("{p}.recurrent_kernel"))?;
            if recurrent.len() != hidden * 4 * hidden {
                return Err(candle_core::Error::Msg(format!("tensor {p}: wrong shape")));
            }
            Ok(LstmW {
                input_w: dense(p, input, 4 * hidden)?,
                recurrent_packed: Packed::new(&recurrent, hidden, 4 * hidden),
                recurrent,
                hidden,
            })
        };
        let seq = cfg.seq_width();
        Ok(FastModel {
            cfg: cfg.clone(),
            forward: lstm("bilstm_forward", cfg.input, cfg.lstm1)?,
            backward: lstm("bilstm_backward", cfg.input, cfg.lstm1)?,
            query: dense("attention.query", seq, cfg.attention)?,
            key: dense("attention.key", seq, cfg.attention)?,
            value: dense("attention.value", seq, cfg.attention)?,
            lstm2: lstm("lstm2", seq + cfg.attention, cfg.lstm2)?,
            dense: dense("dense", cfg.lstm2, cfg.dense)?,
            out: dense("output", cfg.dense, 1)?,
        })
    }

    /// Scores windows (each `window * input` floats, left-padded) with their real lengths.
    /// Returns the scores and, per window, the current transaction's attention weights.
    /// Batches of 64 or more are split in two halves scored on two threads (windows are
    /// independent, so the result is the same).
    pub fn predict(&self, windows: &[&[f32]], lens: &[usize]) -> (Vec<f32>, Vec<Vec<f32>>) {
        self.predict_on(windows, lens, ForwardPath::Kernel(kernel::isa()))
    }

    /// [`FastModel::predict`] on the chosen implementation (the reference is the kernels'
    /// oracle).
    pub fn predict_on(
        &self,
        windows: &[&[f32]],
        lens: &[usize],
        path: ForwardPath,
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        if windows.len() < 64 {
            return self.predict_one_thread(windows, lens, path);
        }
        let half = windows.len() / 2;
        let (first, second) = std::thread::scope(|scope| {
            let other =
                scope.spawn(|| self.predict_one_thread(&windows[half..], &lens[half..], path));
            let first = self.predict_one_thread(&windows[..half], &lens[..half], path);
            (first, other.join().expect("scoring thread panicked"))
        });
        let (mut scores, mut attention) = first;
        scores.extend(second.0);
        attention.extend(second.1);
        (scores, attention)
    }

    fn predict_one_thread(
        &self,
        windows: &[&[f32]],
        lens: &[usize],
        path: ForwardPath,
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        let cfg = &self.cfg;
        let (t_len, b, f) = (cfg.window, windows.len(), cfg.input);
        if b == 0 {
            return (vec![], vec![]);
        }
        let keep = |t: usize, i: usize| t + lens[i] >= t_len;
        // Time-major input [T, B, F].
        let mut xs = vec![0f32; t_len * b * f];
        for (i, w) in windows.iter().enumerate() {
            for t in 0..t_len {
                xs[(t * b + i) * f..(t * b + i + 1) * f].copy_from_slice(&w[t * f..(t + 1) * f]);
            }
        }
        let h1 = cfg.lstm1;
        let mut hf = vec![0f32; t_len * b * h1];
        let mut hb = vec![0f32; t_len * b * h1];
        self.forward.run(&xs, t_len, b, false, &keep, &mut hf, path);
        self.backward.run(&xs, t_len, b, true, &keep, &mut hb, path);
        let (seq_w, a) = (cfg.seq_width(), cfg.attention);
        let rows = t_len * b;
        // LSTM2 input rows [T, B, seq + attention]: the BiLSTM output, then attention.
        let x2w = seq_w + a;
        let mut x2 = vec![0f32; rows * x2w];
        let mut seq = vec![0f32; rows * seq_w];
        for r in 0..rows {
            seq[r * seq_w..r * seq_w + h1].copy_from_slice(&hf[r * h1..(r + 1) * h1]);
            seq[r * seq_w + h1..(r + 1) * seq_w].copy_from_slice(&hb[r * h1..(r + 1) * h1]);
        }
        let (mut q, mut k, mut v) = (
            vec![0f32; rows * a],
            vec![0f32; rows * a],
            vec![0f32; rows * a],
        );
        self.query.apply(&seq, rows, &mut q, path);
        self.key.apply(&seq, rows, &mut k, path);
        self.value.apply(&seq, rows, &mut v, path);
        let mut last_attention = vec![vec![0f32; t_len]; b];
        let mut weights = vec![0f32; t_len];
        for i in 0..b {
            let first_real = t_len - lens[i].min(t_len);
            for tq in 0..t_len {
                let qv = &q[(tq * b + i) * a..(tq * b + i + 1) * a];
                let mut max = f32::NEG_INFINITY;
                for tk in 0..t_len {
                    weights[tk] = if tk < first_real {
                        f32::NEG_INFINITY
                    } else {
                        let kv = &k[(tk * b + i) * a..(tk * b + i + 1) * a];
                        qv.iter().zip(kv).map(|(x, y)| x * y).sum()
                    };
                    max = max.max(weights[tk]);
                }
                let mut sum = 0.0;
                for wgt in weights.iter_mut() {
                    // exp(-inf) = 0 for the padding; the kernel's exp clamps, so skip it there.
                    *wgt = match path {
                        _ if *wgt == f32::NEG_INFINITY => 0.0,
                        ForwardPath::Kernel(_) => kernel::exp(*wgt - max),
                        ForwardPath::Reference => (*wgt - max).exp(),
                    };
                    sum += *wgt;
                }
                let row = tq * b + i;
                let out = &mut x2[row * x2w + seq_w..(row + 1) * x2w];
                out.fill(0.0);
                for (tk, wgt) in weights.iter_mut().enumerate() {
                    *wgt /= sum;
                    if *wgt > 0.0 {
                        let vv = &v[(tk * b + i) * a..(tk * b + i + 1) * a];
                        out.iter_mut().zip(vv).for_each(|(o, x)| *o += *wgt * x);
                    }
                }
                x2[row * x2w..row * x2w + seq_w]
                    .copy_from_slice(&seq[row * seq_w..(row + 1) * seq_w]);
                if tq == t_len - 1 {
                    last_attention[i].copy_from_slice(&weights);
                }
            }
        }
        let h2 = cfg.lstm2;
        let mut hs2 = vec![0f32; rows * h2];
        self.lstm2.run(&x2, t_len, b, false, &keep, &mut hs2, path);
        let last = &hs2[(t_len - 1) * b * h2..];
        let mut hidden = vec![0f32; b * cfg.dense];
        self.dense.apply(last, b, &mut hidden, path);
        hidden.iter_mut().for_each(|x| *x = x.max(0.0));
        let mut logits = vec![0f32; b];
        self.out.apply(&hidden, b, &mut logits, path);
        (logits.into_iter().map(sigmoid).collect(), last_attention)
    }
}
