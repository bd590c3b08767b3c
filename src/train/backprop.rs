//! Training's forward and backward passes written out by hand, on plain `f32` buffers.
//!
//! Candle's autograd records every op of the unrolled network as its own tensor (over a dozen
//! per LSTM step, 30 steps, three LSTMs) and spends most of a training step allocating them and
//! in glibc's `tanhf`. Here one step is: the forward pass keeping what the backward pass needs
//! (gate activations, cells, hidden states, attention weights), then backpropagation through
//! time with the whole-sequence products done once per layer (`X^T·dG`, `dG·W^T`, `H^T·dG`) and
//! only the recurrent product left per step, on weights packed once per optimiser step for the
//! scoring kernels ([`crate::model::kernel`]). The same network, loss and dropout mask stream as
//! [`crate::model::AttentionLstm`] with [`super::loss::FocalLoss`]: a test pins the loss and
//! every gradient to candle's autograd.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use super::loss::FocalLoss;
use crate::model::ModelConfig;
use crate::model::kernel::{self, Isa, Packed};

/// `c [m,n] = a·b + beta·c` with arbitrary strides (so transposes cost nothing): `a` is
/// `[m,k]` with strides `(rsa, csa)`, `b` is `[k,n]` with `(rsb, csb)`, `c` row-major with
/// row stride `ldc`.
#[allow(clippy::too_many_arguments)]
fn mm(
    (m, k, n): (usize, usize, usize),
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    c: &mut [f32],
    ldc: usize,
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, rs: usize, cols: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        k == 0
            || (a.len() > last(m, rsa, k, csa)
                && b.len() > last(k, rsb, n, csb)
                && c.len() > last(m, ldc, n, 1)),
        "mm shapes"
    );
    // SAFETY: the assert keeps the last element each stride pattern reaches inside its slice.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
}

/// `out[j] += Σ_rows x[r * ld + j]` for the first `out.len()` columns.
fn add_column_sums(x: &[f32], ld: usize, rows: usize, out: &mut [f32]) {
    let n = out.len();
    for r in 0..rows {
        for (o, v) in out.iter_mut().zip(&x[r * ld..r * ld + n]) {
            *o += v;
        }
    }
}

/// `w [rows, cols]` transposed, row-major.
fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

/// A dense layer's parameters (Keras layout: `kernel [input, output]`).
#[derive(Debug, Clone)]
struct DenseP {
    kernel: Vec<f32>,
    bias: Vec<f32>,
    input: usize,
    output: usize,
    /// `kernel` packed for the scoring kernels' `x·kernel`, and its transpose for `dy·kernel^T`
    /// (re-packed after every optimiser step).
    packed: Packed,
    packed_t: Packed,
}

impl DenseP {
    fn new(kernel: Vec<f32>, bias: Vec<f32>, input: usize, output: usize) -> Self {
        let packed = Packed::new(&kernel, input, output);
        let packed_t = Packed::new(&transpose(&kernel, input, output), output, input);
        DenseP {
            kernel,
            bias,
            input,
            output,
            packed,
            packed_t,
        }
    }

    fn repack(&mut self) {
        *self = DenseP::new(
            std::mem::take(&mut self.kernel),
            std::mem::take(&mut self.bias),
            self.input,
            self.output,
        );
    }

    /// `y [rows, output] = x·kernel + bias`, `x` with row stride `ldx`, `y` with `ldy`.
    fn forward(&self, x: &[f32], ldx: usize, rows: usize, y: &mut [f32], ldy: usize) {
        if ldy == self.output {
            let y = &mut y[..rows * ldy];
            kernel::matmul_bias(kernel::isa(), x, rows, ldx, &self.packed, &self.bias, y);
            return;
        }
        for r in 0..rows {
            y[r * ldy..r * ldy + self.output].copy_from_slice(&self.bias);
        }
        mm(
            (rows, self.input, self.output),
            x,
            (ldx, 1),
            &self.kernel,
            (self.output, 1),
            y,
            ldy,
            1.0,
        );
    }

    /// Adds `x^T·dy` and the column sums of `dy` to the gradients, and `dy·kernel^T` to `dx`
    /// (row stride `lddx`) when asked.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        x: &[f32],
        ldx: usize,
        rows: usize,
        dy: &[f32],
        ldy: usize,
        g: &mut LayerGrad,
        dx: Option<(&mut [f32], usize)>,
    ) {
        let (i, o) = (self.input, self.output);
        mm(
            (i, rows, o),
            x,
            (1, ldx),
            dy,
            (ldy, 1),
            &mut g.kernel,
            o,
            1.0,
        );
        add_column_sums(dy, ldy, rows, &mut g.bias);
        if let Some((dx, lddx)) = dx {
            if lddx == i && ldy >= o {
                kernel::matmul_acc(kernel::isa(), dy, rows, ldy, &self.packed_t, dx);
                return;
            }
            mm(
                (rows, o, i),
                dy,
                (ldy, 1),
                &self.kernel,
                (1, o),
                dx,
                lddx,
                1.0,
            );
        }
    }
}

/// An LSTM's parameters (Keras's gate order i, f, c, o and one bias), with the recurrent kernel
/// packed for the per-step products of both passes.
#[derive(Debug, Clone)]
struct LstmP {
    input_w: DenseP,
    recurrent: Vec<f32>,
    /// `recurrent [H, 4H]` for the forward pass's `h·R`.
    packed: Packed,
    /// `recurrent^T [4H, H]` for the backward pass's `dG·R^T`.
    packed_t: Packed,
    hidden: usize,
}

impl LstmP {
    fn new(kernel: Vec<f32>, recurrent: Vec<f32>, bias: Vec<f32>, input: usize, h: usize) -> Self {
        let packed = Packed::new(&recurrent, h, 4 * h);
        let packed_t = Packed::new(&transpose(&recurrent, h, 4 * h), 4 * h, h);
        LstmP {
            input_w: DenseP::new(kernel, bias, input, 4 * h),
            recurrent,
            packed,
            packed_t,
            hidden: h,
        }
    }
}

/// One layer's gradients: `kernel`, `bias`, and for an LSTM `recurrent`.
#[derive(Debug, Clone, Default)]
struct LayerGrad {
    kernel: Vec<f32>,
    bias: Vec<f32>,
    recurrent: Vec<f32>,
}

impl LayerGrad {
    fn dense(p: &DenseP) -> Self {
        LayerGrad {
            kernel: vec![0.0; p.kernel.len()],
            bias: vec![0.0; p.bias.len()],
            recurrent: Vec::new(),
        }
    }

    fn lstm(p: &LstmP) -> Self {
        LayerGrad {
            recurrent: vec![0.0; p.recurrent.len()],
            ..LayerGrad::dense(&p.input_w)
        }
    }
}

/// What an LSTM's forward pass keeps for its backward pass, time-major rows `t * B + i`.
#[derive(Debug, Default)]
struct LstmTape {
    /// Gate activations `[T·B, 4H]`: sigmoid(i), sigmoid(f), tanh(c̃), sigmoid(o).
    acts: Vec<f32>,
    /// Cell states `[T·B, H]` after each step (carried through padding).
    c: Vec<f32>,
    /// Hidden states `[T·B, H]` after each step (carried through padding).
    h: Vec<f32>,
}

/// Time steps, windows and real lengths (left padding) of a batch.
#[derive(Clone, Copy)]
struct Steps<'a> {
    t_len: usize,
    lens: &'a [usize],
    reverse: bool,
}

impl Steps<'_> {
    fn b(&self) -> usize {
        self.lens.len()
    }

    fn keep(&self, t: usize, i: usize) -> bool {
        t + self.lens[i] >= self.t_len
    }

    /// Steps in processing order.
    fn order(&self) -> impl DoubleEndedIterator<Item = usize> + use<> {
        let (n, rev) = (self.t_len, self.reverse);
        (0..n).map(move |s| if rev { n - 1 - s } else { s })
    }

    /// The step processed just before `t`, if any.
    fn prev(&self, t: usize) -> Option<usize> {
        if self.reverse {
            (t + 1 < self.t_len).then_some(t + 1)
        } else {
            t.checked_sub(1)
        }
    }
}

impl LstmP {
    /// Runs over `x [T·B, input]` (row stride `ldx`), keeping the tape.
    fn forward(&self, x: &[f32], ldx: usize, s: Steps<'_>, isa: Isa) -> LstmTape {
        let (b, hd) = (s.b(), self.hidden);
        let h4 = 4 * hd;
        let rows = s.t_len * b;
        let mut acts = vec![0.0; rows * h4];
        self.input_w.forward(x, ldx, rows, &mut acts, h4);
        let mut c = vec![0.0; rows * hd];
        let mut h = vec![0.0; rows * hd];
        let mut c_prev = vec![0.0; hd];
        for t in s.order() {
            let prev = s.prev(t);
            let g = &mut acts[t * b * h4..(t + 1) * b * h4];
            if let Some(p) = prev {
                kernel::matmul_acc(isa, &h[p * b * hd..], b, hd, &self.packed, g);
            }
            for i in 0..b {
                let o = (t * b + i) * hd;
                let q = prev.map(|p| (p * b + i) * hd);
                if !s.keep(t, i) {
                    if let Some(q) = q {
                        c.copy_within(q..q + hd, o);
                        h.copy_within(q..q + hd, o);
                    }
                    g[i * h4..(i + 1) * h4].fill(0.0);
                    continue;
                }
                match q {
                    Some(q) => c_prev.copy_from_slice(&c[q..q + hd]),
                    None => c_prev.fill(0.0),
                }
                let gi = &mut g[i * h4..(i + 1) * h4];
                cell_forward(isa, gi, &c_prev, &mut c[o..o + hd], &mut h[o..o + hd]);
            }
        }
        LstmTape { acts, c, h }
    }

    /// Backpropagation through time: `dh [T·B, H]` is the loss's gradient on every step's
    /// output; adds the parameters' gradients to `g` and, when asked, the input's to `dx`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        x: &[f32],
        ldx: usize,
        s: Steps<'_>,
        tape: &LstmTape,
        dh: &[f32],
        g: &mut LayerGrad,
        dx: Option<(&mut [f32], usize)>,
        isa: Isa,
    ) {
        let (b, hd) = (s.b(), self.hidden);
        let h4 = 4 * hd;
        let rows = s.t_len * b;
        let mut dg = vec![0.0; rows * h4];
        // Gradients reaching step t's state from the step processed after it.
        let mut dh_next = vec![0.0; b * hd];
        let mut dc_next = vec![0.0; b * hd];
        let mut hprev = vec![0.0; rows * hd];
        let zeros = vec![0.0; hd];
        for t in s.order().rev() {
            let prev = s.prev(t);
            let dgt = &mut dg[t * b * h4..(t + 1) * b * h4];
            for i in 0..b {
                let o = (t * b + i) * hd;
                let dhn = &mut dh_next[i * hd..(i + 1) * hd];
                for (d, e) in dhn.iter_mut().zip(&dh[o..o + hd]) {
                    *d += e;
                }
                if !s.keep(t, i) {
                    // Padding carried the state through: its gradients pass through unchanged.
                    continue;
                }
                if let Some(p) = prev {
                    let q = (p * b + i) * hd;
                    hprev[o..o + hd].copy_from_slice(&tape.h[q..q + hd]);
                }
                let a = &tape.acts[(t * b + i) * h4..(t * b + i + 1) * h4];
                let cp = match prev {
                    Some(p) => &tape.c[(p * b + i) * hd..(p * b + i + 1) * hd],
                    None => &zeros[..],
                };
                let cell = CellGrad {
                    acts: a,
                    c: &tape.c[o..o + hd],
                    c_prev: cp,
                    dh: dhn,
                };
                cell_backward(
                    isa,
                    &cell,
                    &mut dc_next[i * hd..(i + 1) * hd],
                    &mut dgt[i * h4..(i + 1) * h4],
                );
                // What reaches the previous step's output comes from the recurrent product.
                dhn.fill(0.0);
            }
            if prev.is_some() {
                kernel::matmul_acc(isa, dgt, b, h4, &self.packed_t, &mut dh_next);
            }
        }
        self.input_w.backward(x, ldx, rows, &dg, h4, g, dx);
        mm(
            (hd, rows, h4),
            &hprev,
            (1, hd),
            &dg,
            (h4, 1),
            &mut g.recurrent,
            h4,
            1.0,
        );
    }
}

/// One LSTM step of one window, keeping the activations: `g [4H]` holds the pre-activation
/// gates and is overwritten with sigmoid(i), sigmoid(f), tanh(c̃), sigmoid(o); `c_prev` is the
/// previous cell (zeros at the first step). Vectorised for `isa`.
fn cell_forward(isa: Isa, g: &mut [f32], c_prev: &[f32], c: &mut [f32], h: &mut [f32]) {
    isa.require();
    match isa {
        // SAFETY: the CPU has the features (checked above).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { cell_forward_avx512(g, c_prev, c, h) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { cell_forward_avx2(g, c_prev, c, h) },
        _ => cell_forward_any(g, c_prev, c, h),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn cell_forward_avx512(g: &mut [f32], c_prev: &[f32], c: &mut [f32], h: &mut [f32]) {
    cell_forward_any(g, c_prev, c, h)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn cell_forward_avx2(g: &mut [f32], c_prev: &[f32], c: &mut [f32], h: &mut [f32]) {
    cell_forward_any(g, c_prev, c, h)
}

#[inline(always)]
fn cell_forward_any(g: &mut [f32], c_prev: &[f32], c: &mut [f32], h: &mut [f32]) {
    let hd = c.len();
    assert!(
        h.len() == hd && c_prev.len() == hd && g.len() == 4 * hd,
        "cell shapes"
    );
    let (gi, rest) = g.split_at_mut(hd);
    let (gf, rest) = rest.split_at_mut(hd);
    let (gc, go) = rest.split_at_mut(hd);
    for j in 0..hd {
        let ig = kernel::sigmoid(gi[j]);
        let fg = kernel::sigmoid(gf[j]);
        let cg = kernel::tanh(gc[j]);
        let og = kernel::sigmoid(go[j]);
        let cj = fg * c_prev[j] + ig * cg;
        c[j] = cj;
        h[j] = og * kernel::tanh(cj);
        gi[j] = ig;
        gf[j] = fg;
        gc[j] = cg;
        go[j] = og;
    }
}

/// What one step's backward pass reads: the step's activations, cell, previous cell and the
/// gradient on its hidden state.
struct CellGrad<'a> {
    acts: &'a [f32],
    c: &'a [f32],
    c_prev: &'a [f32],
    dh: &'a [f32],
}

/// One LSTM step's backward pass for one window: the gates' pre-activation gradients into `dg`,
/// and `dc` (the cell's gradient from the step after) replaced by the previous cell's.
fn cell_backward(isa: Isa, x: &CellGrad<'_>, dc: &mut [f32], dg: &mut [f32]) {
    isa.require();
    match isa {
        // SAFETY: the CPU has the features (checked above).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { cell_backward_avx512(x, dc, dg) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { cell_backward_avx2(x, dc, dg) },
        _ => cell_backward_any(x, dc, dg),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn cell_backward_avx512(x: &CellGrad<'_>, dc: &mut [f32], dg: &mut [f32]) {
    cell_backward_any(x, dc, dg)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn cell_backward_avx2(x: &CellGrad<'_>, dc: &mut [f32], dg: &mut [f32]) {
    cell_backward_any(x, dc, dg)
}

#[inline(always)]
fn cell_backward_any(x: &CellGrad<'_>, dc: &mut [f32], dg: &mut [f32]) {
    let hd = dc.len();
    assert!(
        x.acts.len() == 4 * hd
            && x.c.len() == hd
            && x.c_prev.len() == hd
            && x.dh.len() == hd
            && dg.len() == 4 * hd,
        "cell shapes"
    );
    let (ai, rest) = x.acts.split_at(hd);
    let (af, rest) = rest.split_at(hd);
    let (ac, ao) = rest.split_at(hd);
    let (di, rest) = dg.split_at_mut(hd);
    let (df, rest) = rest.split_at_mut(hd);
    let (dcc, dout) = rest.split_at_mut(hd);
    for j in 0..hd {
        let (ig, fg, cg, og) = (ai[j], af[j], ac[j], ao[j]);
        let tc = kernel::tanh(x.c[j]);
        let dhj = x.dh[j];
        let d = dc[j] + dhj * og * (1.0 - tc * tc);
        di[j] = d * cg * ig * (1.0 - ig);
        df[j] = d * x.c_prev[j] * fg * (1.0 - fg);
        dcc[j] = d * ig * (1.0 - cg * cg);
        dout[j] = dhj * tc * og * (1.0 - og);
        dc[j] = d * fg;
    }
}

/// The attention-LSTM's parameters as plain buffers, for training steps.
#[derive(Debug, Clone)]
pub struct Net {
    cfg: ModelConfig,
    forward: LstmP,
    backward: LstmP,
    query: DenseP,
    key: DenseP,
    value: DenseP,
    lstm2: LstmP,
    dense: DenseP,
    out: DenseP,
}

/// The gradients of one batch, by variable name (as in the model's `VarMap`).
pub type Gradients = HashMap<String, Vec<f32>>;

impl Net {
    /// The network with the weights of `w` (the model's variables by name).
    pub fn new(cfg: &ModelConfig, w: &HashMap<String, Tensor>) -> candle_core::Result<Self> {
        let take = |name: &str| -> candle_core::Result<Vec<f32>> {
            w.get(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("missing weight {name}")))?
                .flatten_all()?
                .to_vec1::<f32>()
        };
        let lstm = |name: &str, input: usize, h: usize| -> candle_core::Result<LstmP> {
            Ok(LstmP::new(
                take(&format!("{name}.kernel"))?,
                take(&format!("{name}.recurrent_kernel"))?,
                take(&format!("{name}.bias"))?,
                input,
                h,
            ))
        };
        let dense = |name: &str, input: usize, output: usize| -> candle_core::Result<DenseP> {
            Ok(DenseP::new(
                take(&format!("{name}.kernel"))?,
                take(&format!("{name}.bias"))?,
                input,
                output,
            ))
        };
        let (s, a) = (cfg.seq_width(), cfg.attention);
        Ok(Net {
            cfg: cfg.clone(),
            forward: lstm("bilstm_forward", cfg.input, cfg.lstm1)?,
            backward: lstm("bilstm_backward", cfg.input, cfg.lstm1)?,
            query: dense("attention.query", s, a)?,
            key: dense("attention.key", s, a)?,
            value: dense("attention.value", s, a)?,
            lstm2: lstm("lstm2", s + a, cfg.lstm2)?,
            dense: dense("dense", cfg.lstm2, cfg.dense)?,
            out: dense("output", cfg.dense, 1)?,
        })
    }

    /// Every parameter by name, mutably (what an optimiser updates).
    fn params_mut(&mut self) -> Vec<(String, &mut Vec<f32>)> {
        let mut v = Vec::new();
        for (name, l) in [
            ("bilstm_forward", &mut self.forward),
            ("bilstm_backward", &mut self.backward),
            ("lstm2", &mut self.lstm2),
        ] {
            v.push((format!("{name}.kernel"), &mut l.input_w.kernel));
            v.push((format!("{name}.bias"), &mut l.input_w.bias));
            v.push((format!("{name}.recurrent_kernel"), &mut l.recurrent));
        }
        for (name, d) in [
            ("attention.query", &mut self.query),
            ("attention.key", &mut self.key),
            ("attention.value", &mut self.value),
            ("dense", &mut self.dense),
            ("output", &mut self.out),
        ] {
            v.push((format!("{name}.kernel"), &mut d.kernel));
            v.push((format!("{name}.bias"), &mut d.bias));
        }
        v
    }

    /// Re-packs the kernels after their values changed.
    fn repack(&mut self) {
        for d in [
            &mut self.query,
            &mut self.key,
            &mut self.value,
            &mut self.dense,
            &mut self.out,
        ] {
            d.repack();
        }
        for l in [&mut self.forward, &mut self.backward, &mut self.lstm2] {
            *l = LstmP::new(
                std::mem::take(&mut l.input_w.kernel),
                std::mem::take(&mut l.recurrent),
                std::mem::take(&mut l.input_w.bias),
                l.input_w.input,
                l.hidden,
            );
        }
    }

    /// The weights as named tensors (for the bundle and for scoring).
    pub fn weights(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        let mut copy = self.clone();
        let shapes = self.shapes();
        copy.params_mut()
            .into_iter()
            .map(|(name, v)| {
                let shape = shapes[&name].clone();
                Ok((name, Tensor::from_slice(v, shape, &Device::Cpu)?))
            })
            .collect()
    }

    fn shapes(&self) -> HashMap<String, Vec<usize>> {
        let mut m = HashMap::new();
        for (name, l) in [
            ("bilstm_forward", &self.forward),
            ("bilstm_backward", &self.backward),
            ("lstm2", &self.lstm2),
        ] {
            let (i, h) = (l.input_w.input, l.hidden);
            m.insert(format!("{name}.kernel"), vec![i, 4 * h]);
            m.insert(format!("{name}.bias"), vec![4 * h]);
            m.insert(format!("{name}.recurrent_kernel"), vec![h, 4 * h]);
        }
        for (name, d) in [
            ("attention.query", &self.query),
            ("attention.key", &self.key),
            ("attention.value", &self.value),
            ("dense", &self.dense),
            ("output", &self.out),
        ] {
            m.insert(format!("{name}.kernel"), vec![d.input, d.output]);
            m.insert(format!("{name}.bias"), vec![d.output]);
        }
        m
    }

    /// The mean focal loss of a batch and its gradient on every parameter. `windows` are
    /// left-padded `window × input` floats with real lengths `lens` (each at least 1); `dropout`
    /// carries the training RNG (the same mask stream as the candle network's), None for none.
    pub fn loss_and_gradients(
        &self,
        windows: &[&[f32]],
        lens: &[usize],
        targets: &[f32],
        loss: &FocalLoss,
        dropout: Option<&mut ChaCha8Rng>,
    ) -> (f64, Gradients) {
        let isa = kernel::isa();
        let cfg = &self.cfg;
        let (t_len, b, f) = (cfg.window, windows.len(), cfg.input);
        assert!(
            lens.len() == b && targets.len() == b && b > 0,
            "batch shapes"
        );
        assert!(lens.iter().all(|&l| l >= 1), "every window has a real step");
        let lens: Vec<usize> = lens.iter().map(|&l| l.min(t_len)).collect();
        let rows = t_len * b;
        let mut xs = vec![0.0; rows * f];
        for (i, w) in windows.iter().enumerate() {
            for t in 0..t_len {
                xs[(t * b + i) * f..(t * b + i + 1) * f].copy_from_slice(&w[t * f..(t + 1) * f]);
            }
        }
        let fwd = Steps {
            t_len,
            lens: &lens,
            reverse: false,
        };
        let bwd = Steps {
            reverse: true,
            ..fwd
        };
        // BiLSTM.
        let (tape_f, tape_b) = (
            self.forward.forward(&xs, f, fwd, isa),
            self.backward.forward(&xs, f, bwd, isa),
        );
        let (h1, sw, a) = (cfg.lstm1, cfg.seq_width(), cfg.attention);
        let x2w = sw + a;
        // LSTM 2's input [T·B, seq + attention]: the dropped-out BiLSTM states, then attention.
        let mut x2 = vec![0.0; rows * x2w];
        let mask = dropout
            .filter(|_| cfg.dropout > 0.0)
            .map(|rng| dropout_mask(rows * sw, cfg.dropout, rng));
        for r in 0..rows {
            let dst = &mut x2[r * x2w..r * x2w + sw];
            dst[..h1].copy_from_slice(&tape_f.h[r * h1..(r + 1) * h1]);
            dst[h1..].copy_from_slice(&tape_b.h[r * h1..(r + 1) * h1]);
            if let Some(m) = &mask {
                for (d, k) in dst.iter_mut().zip(&m[r * sw..(r + 1) * sw]) {
                    *d *= k;
                }
            }
        }
        // Attention.
        let mut q = vec![0.0; rows * a];
        let mut k = vec![0.0; rows * a];
        let mut v = vec![0.0; rows * a];
        self.query.forward(&x2, x2w, rows, &mut q, a);
        self.key.forward(&x2, x2w, rows, &mut k, a);
        self.value.forward(&x2, x2w, rows, &mut v, a);
        let first = |i: usize| t_len - lens[i];
        let row = |t: usize, i: usize| t * b + i;
        // Per window: scores [T, real] = Q·K^T over the real keys, a softmax per query, and
        // the output W·V written into LSTM 2's input (padded keys get exactly zero weight).
        let mut weights = vec![0.0f32; b * t_len * t_len];
        for i in 0..b {
            let (fr, n) = (first(i), lens[i]);
            let w = &mut weights[i * t_len * t_len..(i + 1) * t_len * t_len];
            let kr = &k[row(fr, i) * a..];
            mm(
                (t_len, a, n),
                &q[i * a..],
                (b * a, 1),
                kr,
                (1, b * a),
                &mut w[fr..],
                t_len,
                0.0,
            );
            for wt in w.chunks_exact_mut(t_len) {
                let wt = &mut wt[fr..];
                let max = wt.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let mut sum = 0.0;
                for x in wt.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                wt.iter_mut().for_each(|x| *x /= sum);
            }
            let vr = &v[row(fr, i) * a..];
            let out = &mut x2[i * x2w + sw..];
            mm(
                (t_len, n, a),
                &w[fr..],
                (t_len, 1),
                vr,
                (b * a, 1),
                out,
                b * x2w,
                0.0,
            );
        }
        // LSTM 2, dense, output.
        let tape2 = self.lstm2.forward(&x2, x2w, fwd, isa);
        let h2 = cfg.lstm2;
        let last = &tape2.h[(t_len - 1) * b * h2..];
        let d = cfg.dense;
        let mut hidden = vec![0.0; b * d];
        self.dense.forward(last, h2, b, &mut hidden, d);
        let relu: Vec<f32> = hidden.iter().map(|x| x.max(0.0)).collect();
        let mut logits = vec![0.0; b];
        self.out.forward(&relu, d, b, &mut logits, 1);
        // Loss and its gradient on the logits.
        let mut total = 0.0;
        let dlogits: Vec<f32> = logits
            .iter()
            .zip(targets)
            .map(|(&z, &y)| {
                let (l, dz) = focal(loss, f64::from(z), f64::from(y));
                total += l;
                (dz / b as f64) as f32
            })
            .collect();
        // Backward.
        let mut g_out = LayerGrad::dense(&self.out);
        let mut g_dense = LayerGrad::dense(&self.dense);
        let mut drelu = vec![0.0; b * d];
        self.out
            .backward(&relu, d, b, &dlogits, 1, &mut g_out, Some((&mut drelu, d)));
        for (g, x) in drelu.iter_mut().zip(&hidden) {
            if *x <= 0.0 {
                *g = 0.0;
            }
        }
        let mut dh2 = vec![0.0; rows * h2];
        self.dense.backward(
            last,
            h2,
            b,
            &drelu,
            d,
            &mut g_dense,
            Some((&mut dh2[(t_len - 1) * b * h2..], h2)),
        );
        let mut g_lstm2 = LayerGrad::lstm(&self.lstm2);
        let mut dx2 = vec![0.0; rows * x2w];
        self.lstm2.backward(
            &x2,
            x2w,
            fwd,
            &tape2,
            &dh2,
            &mut g_lstm2,
            Some((&mut dx2, x2w)),
            isa,
        );
        // Attention backward, per window and query step.
        let mut dq = vec![0.0; rows * a];
        let mut dk = vec![0.0; rows * a];
        let mut dv = vec![0.0; rows * a];
        let mut ds = vec![0.0f32; t_len * t_len];
        for i in 0..b {
            let (fr, n) = (first(i), lens[i]);
            let w = &weights[i * t_len * t_len + fr..];
            let da = &dx2[i * x2w + sw..];
            let ds = &mut ds[..t_len * n];
            let (qi, kr, vr) = (i * a, row(fr, i) * a, row(fr, i) * a);
            // dW = dA·V^T; dV += W^T·dA.
            mm(
                (t_len, a, n),
                da,
                (b * x2w, 1),
                &v[vr..],
                (1, b * a),
                ds,
                n,
                0.0,
            );
            mm(
                (n, t_len, a),
                w,
                (1, t_len),
                da,
                (b * x2w, 1),
                &mut dv[vr..],
                b * a,
                1.0,
            );
            // Through the softmax: dS = W ⊙ (dW - Σ W·dW) per query.
            for (t, dst) in ds.chunks_exact_mut(n).enumerate() {
                let wt = &w[t * t_len..t * t_len + n];
                let dot: f32 = wt.iter().zip(dst.iter()).map(|(x, y)| x * y).sum();
                for (d, x) in dst.iter_mut().zip(wt) {
                    *d = x * (*d - dot);
                }
            }
            // dQ += dS·K; dK += dS^T·Q.
            mm(
                (t_len, n, a),
                ds,
                (n, 1),
                &k[kr..],
                (b * a, 1),
                &mut dq[qi..],
                b * a,
                1.0,
            );
            mm(
                (n, t_len, a),
                ds,
                (1, n),
                &q[qi..],
                (b * a, 1),
                &mut dk[kr..],
                b * a,
                1.0,
            );
        }
        let mut g_q = LayerGrad::dense(&self.query);
        let mut g_k = LayerGrad::dense(&self.key);
        let mut g_v = LayerGrad::dense(&self.value);
        for (layer, dy, g) in [
            (&self.query, &dq, &mut g_q),
            (&self.key, &dk, &mut g_k),
            (&self.value, &dv, &mut g_v),
        ] {
            layer.backward(&x2, x2w, rows, dy, a, g, Some((&mut dx2, x2w)));
        }
        // Through the dropout to the BiLSTM's outputs.
        let mut dh_f = vec![0.0; rows * h1];
        let mut dh_b = vec![0.0; rows * h1];
        for r in 0..rows {
            let ds = &mut dx2[r * x2w..r * x2w + sw];
            if let Some(m) = &mask {
                for (d, k) in ds.iter_mut().zip(&m[r * sw..(r + 1) * sw]) {
                    *d *= k;
                }
            }
            dh_f[r * h1..(r + 1) * h1].copy_from_slice(&ds[..h1]);
            dh_b[r * h1..(r + 1) * h1].copy_from_slice(&ds[h1..]);
        }
        let mut g_f = LayerGrad::lstm(&self.forward);
        let mut g_b = LayerGrad::lstm(&self.backward);
        self.forward
            .backward(&xs, f, fwd, &tape_f, &dh_f, &mut g_f, None, isa);
        self.backward
            .backward(&xs, f, bwd, &tape_b, &dh_b, &mut g_b, None, isa);
        let mut grads = Gradients::new();
        for (name, g) in [
            ("bilstm_forward", g_f),
            ("bilstm_backward", g_b),
            ("lstm2", g_lstm2),
        ] {
            grads.insert(format!("{name}.kernel"), g.kernel);
            grads.insert(format!("{name}.bias"), g.bias);
            grads.insert(format!("{name}.recurrent_kernel"), g.recurrent);
        }
        for (name, g) in [
            ("attention.query", g_q),
            ("attention.key", g_k),
            ("attention.value", g_v),
            ("dense", g_dense),
            ("output", g_out),
        ] {
            grads.insert(format!("{name}.kernel"), g.kernel);
            grads.insert(format!("{name}.bias"), g.bias);
        }
        (total / b as f64, grads)
    }
}

/// Inverted dropout's mask, drawn as the candle network draws it (one `f32` per element, in
/// time-major row order): 0 where dropped, `1 / (1 - p)` where kept.
fn dropout_mask(n: usize, p: f32, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let scale = 1.0 / (1.0 - p);
    (0..n)
        .map(|_| if rng.random::<f32>() < p { 0.0 } else { scale })
        .collect()
}

/// One example's focal loss (as [`FocalLoss::forward`] computes it) and its derivative in the
/// logit `z`, for target `y` in {0, 1}.
fn focal(l: &FocalLoss, z: f64, y: f64) -> (f64, f64) {
    let softplus = |x: f64| x.max(0.0) + (-x.abs()).exp().ln_1p();
    let (log_p, log_q) = (-softplus(-z), -softplus(z));
    let (p, q) = (log_p.exp(), log_q.exp());
    let (wp, wn) = (l.alpha * l.weight_pos, (1.0 - l.alpha) * l.weight_neg);
    let pos = wp * q.powf(l.gamma) * log_p;
    let neg = wn * p.powf(l.gamma) * log_q;
    let dpos = wp * q.powf(l.gamma) * (q - l.gamma * p * log_p);
    let dneg = wn * p.powf(l.gamma) * (l.gamma * q * log_q - p);
    (-(y * pos + (1.0 - y) * neg), -(y * dpos + (1.0 - y) * dneg))
}

/// Adam (no weight decay, as the notebook's Keras optimiser), on the network's buffers.
#[derive(Debug)]
pub struct Adam {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    step: i32,
    moments: HashMap<String, (Vec<f32>, Vec<f32>)>,
}

impl Adam {
    /// Adam with learning rate `lr`, betas 0.9 / 0.999 and epsilon 1e-7 (Keras's).
    pub fn new(lr: f64) -> Self {
        Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-7,
            step: 0,
            moments: HashMap::new(),
        }
    }

    /// One update of every parameter of `net` with `grads` (candle's `AdamW` with weight decay
    /// 0, step for step).
    pub fn step(&mut self, net: &mut Net, grads: &Gradients) {
        self.step += 1;
        let scale_m = 1.0 / (1.0 - self.beta1.powi(self.step));
        let scale_v = 1.0 / (1.0 - self.beta2.powi(self.step));
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        for (name, theta) in net.params_mut() {
            let Some(g) = grads.get(&name) else { continue };
            let (m, v) = self
                .moments
                .entry(name)
                .or_insert_with(|| (vec![0.0; g.len()], vec![0.0; g.len()]));
            for j in 0..g.len() {
                m[j] = b1 * m[j] + (1.0 - b1) * g[j];
                v[j] = b2 * v[j] + (1.0 - b2) * g[j] * g[j];
                let m_hat = f64::from(m[j]) * scale_m;
                let v_hat = f64::from(v[j]) * scale_v;
                theta[j] -= (self.lr * m_hat / (v_hat.sqrt() + self.eps)) as f32;
            }
        }
        net.repack();
    }
}

/// Adds `b`'s gradients times `wb` to `a`'s times `wa` (the two halves of a data-parallel step).
pub fn combine(mut a: Gradients, wa: f32, b: &Gradients, wb: f32) -> Gradients {
    for (name, ga) in a.iter_mut() {
        let gb = &b[name];
        for (x, y) in ga.iter_mut().zip(gb) {
            *x = wa * *x + wb * y;
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::model::{Batch, ThresholdRule, init, weights};
    use crate::train::{Engine, EpochRecord, TrainObserver, TrainSettings, WindowSet, fit};

    fn small() -> ModelConfig {
        ModelConfig {
            input: 5,
            window: 7,
            lstm1: 12,
            attention: 6,
            lstm2: 8,
            dense: 4,
            dropout: 0.25,
        }
    }

    /// `b` random windows of every padding length in turn, padding filled with noise (both
    /// networks must ignore it), and alternating labels.
    fn batch(cfg: &ModelConfig, b: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<usize>, Vec<f32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = cfg.window * cfg.input;
        let windows = (0..b)
            .map(|_| (0..n).map(|_| rng.random::<f32>() * 4.0 - 2.0).collect())
            .collect();
        let lens = (0..b).map(|i| 1 + i % cfg.window).collect();
        let y = (0..b).map(|i| (i % 3 == 0) as u8 as f32).collect();
        (windows, lens, y)
    }

    /// Largest difference relative to the largest magnitude of `want`.
    fn rel_diff(got: &[f32], want: &[f32]) -> f32 {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        got.iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
            / scale
    }

    #[test]
    fn loss_and_every_gradient_match_candle_autograd() {
        for (cfg, b) in [
            (small(), 10),
            (ModelConfig::notebook(30, 30), 3),
            (
                ModelConfig {
                    dropout: 0.0,
                    ..small()
                },
                4,
            ),
        ] {
            let (model, varmap) = init(&cfg, 11, &Device::Cpu).unwrap();
            let w = weights(&varmap).unwrap();
            let net = Net::new(&cfg, &w).unwrap();
            let (windows, lens, y) = batch(&cfg, b, 5);
            let ws: Vec<&[f32]> = windows.iter().map(|w| w.as_slice()).collect();
            let loss_fn = FocalLoss::default();
            for dropout in [false, true] {
                let mut rng = ChaCha8Rng::seed_from_u64(99);
                let (loss, grads) =
                    net.loss_and_gradients(&ws, &lens, &y, &loss_fn, dropout.then_some(&mut rng));
                let mut rng = ChaCha8Rng::seed_from_u64(99);
                let input = Batch::new(&ws, &lens, cfg.window, cfg.input, &Device::Cpu).unwrap();
                let out = model.forward(&input, dropout.then_some(&mut rng)).unwrap();
                let targets = Tensor::from_vec(y.clone(), b, &Device::Cpu).unwrap();
                let want = loss_fn.forward(&out.logits, &targets).unwrap();
                let want_loss = f64::from(want.to_scalar::<f32>().unwrap());
                assert!(
                    (loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
                    "loss {loss} vs candle {want_loss}"
                );
                let store = want.backward().unwrap();
                let data = varmap.data().lock().unwrap();
                assert_eq!(grads.len(), data.len(), "a gradient for every variable");
                for (name, var) in data.iter() {
                    let want: Vec<f32> = store
                        .get(var.as_tensor())
                        .unwrap_or_else(|| panic!("candle has no gradient for {name}"))
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    if name == "attention.key.bias" {
                        // Adding q·b to every score of a query leaves its softmax as it was: the
                        // gradient is zero, both compute rounding noise.
                        let max = grads[name].iter().fold(0f32, |m, x| m.max(x.abs()));
                        assert!(max < 1e-5, "key bias gradient {max}");
                        continue;
                    }
                    let d = rel_diff(&grads[name], &want);
                    assert!(
                        d < 2e-4,
                        "{name} (dropout {dropout}): relative difference {d}"
                    );
                }
            }
        }
    }

    #[test]
    fn focal_derivative_matches_finite_differences() {
        let l = FocalLoss::default();
        for y in [0.0, 1.0] {
            for z in [-9.0, -2.5, -0.3, 0.0, 0.7, 3.0, 12.0] {
                let (_, dz) = focal(&l, z, y);
                let h = 1e-6;
                let num = (focal(&l, z + h, y).0 - focal(&l, z - h, y).0) / (2.0 * h);
                assert!(
                    (dz - num).abs() < 1e-6 * num.abs().max(1.0),
                    "y {y} z {z}: {dz} vs {num}"
                );
            }
        }
    }

    struct Quiet;
    impl TrainObserver for Quiet {
        fn epoch_start(&mut self, _: usize, _: usize) {}
        fn batch_done(&mut self, _: usize, _: f64) {}
        fn epoch_end(&mut self, _: &EpochRecord, _: bool) {}
    }

    #[test]
    fn an_epoch_on_the_kernels_updates_the_weights_as_candle_does() {
        let cfg = small();
        let (windows, lens, y) = batch(&cfg, 40, 8);
        let mut set = WindowSet::new(cfg.window, cfg.input);
        for ((w, l), y) in windows.iter().zip(&lens).zip(&y) {
            set.data.extend_from_slice(w);
            set.lens.push(*l);
            set.labels.push(*y > 0.5);
            set.ts.push(0.0);
            set.keys.push("card".into());
            set.ids.push(None);
        }
        let settings = |engine| TrainSettings {
            epochs: 2,
            batch_size: 9,
            lr: 1e-3,
            loss: FocalLoss::default(),
            neg_per_pos: None,
            patience: 5,
            seed: 3,
            time_budget_s: None,
            engine,
        };
        let run = |engine| {
            let (model, varmap) = init(&cfg, 3, &Device::Cpu).unwrap();
            let s = settings(engine);
            fit(
                &model,
                &varmap,
                &set,
                &set,
                &s,
                ThresholdRule::MaxF1,
                &mut Quiet,
            )
            .unwrap()
        };
        let (kernels, candle) = (run(Engine::Kernels), run(Engine::Candle));
        assert_eq!(kernels.history.len(), 2);
        for (k, c) in kernels.history.iter().zip(&candle.history) {
            assert!(
                (k.loss - c.loss).abs() < 1e-4 * c.loss,
                "{} vs {}",
                k.loss,
                c.loss
            );
        }
        let (init_w, _) = {
            let (_, varmap) = init(&cfg, 3, &Device::Cpu).unwrap();
            (weights(&varmap).unwrap(), ())
        };
        for (name, want) in &candle.weights {
            if name == "attention.key.bias" {
                continue; // no gradient (see above): Adam moves it by rounding noise alone
            }
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (got, want, start) = (
                flat(&kernels.weights[name]),
                flat(want),
                flat(&init_w[name]),
            );
            let moved: Vec<f32> = want.iter().zip(&start).map(|(a, b)| a - b).collect();
            let diff: Vec<f32> = got.iter().zip(&start).map(|(a, b)| a - b).collect();
            // Ten Adam steps of lr 1e-3 moved every weight; both engines moved it the same way.
            assert!(moved.iter().any(|m| m.abs() > 1e-4), "{name} did not train");
            let d = rel_diff(&diff, &moved);
            assert!(d < 2e-2, "{name}: updates differ by {d} of their size");
        }
    }
}
