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

use super::bf16::{self, PackedBf16};
use super::config::ModelConfig;
use super::int8::{self, PackedI8};
use super::kernel::{self, Isa, Packed, PackedLstm, scratch};
use super::pool;

/// Batches of at least this many windows are split in two halves, one per core; a single window
/// runs the BiLSTM's two directions on the two cores instead. Splitting measured faster from two
/// windows up (f32: batch 4 about 7,000 windows/s against 4,900 with the directions side by
/// side, batch 32 about 9,000 against 6,500).
const SPLIT_BATCH: usize = 2;

/// A thread scores its windows in sub-batches of at most this many, as even as possible: a
/// sub-batch's layer buffers stay in L2 (at 128 windows LSTM 2's input alone is 4.9 MB and the
/// attention's queries, keys and values 2.9 MB, streamed from memory). Batch 256, windows/s
/// (both cores, alternating runs): f32 9,855-10,072 -> 10,495-10,510, AVX2 7,619 -> 8,766,
/// bf16 16,437 -> 16,999, int8 23,588 -> 23,762; 16 and 24 measured within noise of 32.
const SUB_BATCH: usize = 32;

/// From this many windows on one thread, an f32 layer on AVX-512 runs each step as one fused
/// product and cell ([`kernel::lstm_step`]): the gates never reach memory, and a tile of rows
/// shares every weight it loads. Measured (windows/s, both cores) against the separate input
/// projection, recurrent product and cell: batch 4 6,900 -> 9,157, batch 8 7,024 -> 9,938,
/// batch 32 9,160 -> 10,542, batch 256 ~9,700 -> ~10,100; one window a thread runs faster on
/// the separate path (batch 1 4,054 against 3,151), and so does AVX2, whose 16 registers hold
/// a single row's tile (batch 256 8,174 against 5,649).
const FUSED_STEP_ROWS: usize = 2;

/// Which implementation of the forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardPath {
    /// Packed weights, fused LSTM cells, vectorised activations (see [`super::kernel`]), on
    /// this instruction set.
    Kernel(Isa),
    /// A general GEMM (`matrixmultiply`) and scalar activations: the oracle.
    Reference,
    /// Every matrix product in bfloat16 with f32 accumulation (AVX512_BF16, [`super::bf16`]),
    /// activations and attention as [`ForwardPath::Kernel`] with AVX-512.
    Bf16,
    /// The products of hidden states (recurrent, attention projections, LSTM 2's input) in
    /// 8-bit integers (AVX-512 BW, with VNNI where present: [`super::int8`]); the raw
    /// features' projection and the dense head in bf16 where the CPU has AVX512_BF16 (a row
    /// of raw features quantized to 1/127 of its largest feature lost twice the alert
    /// decisions), f32 elsewhere; activations and attention as [`ForwardPath::Kernel`] with
    /// AVX-512.
    Int8,
}

/// The arithmetic scoring uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Precision {
    /// Single precision throughout (the default).
    #[default]
    F32,
    /// bfloat16 matrix products with f32 accumulation, where the CPU has AVX512_BF16 (see the
    /// README for its speed and what it changes).
    Bf16,
    /// 8-bit integer products of hidden states (weights per column, activations per row),
    /// where the CPU has AVX-512 BW (see the README for its speed and what it changes).
    Int8,
}

static PRECISION: std::sync::OnceLock<Precision> = std::sync::OnceLock::new();

/// Sets the process's scoring precision (once, before scoring starts; `--precision`). Fails
/// when the CPU cannot run it or it was already set to something else.
pub fn set_precision(p: Precision) -> Result<(), String> {
    p.path()?;
    match PRECISION.get_or_init(|| p) {
        set if *set == p => Ok(()),
        set => Err(format!("scoring precision already set to {set:?}")),
    }
}

impl Precision {
    /// The forward path that scores at this precision on this machine, or why this CPU cannot.
    pub fn path(self) -> Result<ForwardPath, String> {
        match self {
            Precision::F32 => Ok(ForwardPath::Kernel(kernel::isa())),
            Precision::Bf16 if super::bf16::available() => Ok(ForwardPath::Bf16),
            Precision::Bf16 => {
                Err("--precision bf16 needs a CPU with AVX512_BF16 (this one has none)".into())
            }
            Precision::Int8 if super::int8::available() => Ok(ForwardPath::Int8),
            Precision::Int8 => {
                Err("--precision int8 needs a CPU with AVX-512 BW (this one has none)".into())
            }
        }
    }
}

/// The scoring precision (f32 unless [`set_precision`] chose another).
pub fn precision() -> Precision {
    PRECISION.get().copied().unwrap_or_default()
}

impl ForwardPath {
    /// The path scoring takes on this machine at this process's precision.
    pub fn scoring() -> Self {
        match precision() {
            Precision::Bf16 => ForwardPath::Bf16,
            Precision::Int8 => ForwardPath::Int8,
            Precision::F32 => ForwardPath::Kernel(kernel::isa()),
        }
    }

    /// The instruction set of the activations and attention, None for the reference.
    fn isa(self) -> Option<Isa> {
        match self {
            ForwardPath::Kernel(isa) => Some(isa),
            ForwardPath::Bf16 | ForwardPath::Int8 => Some(Isa::Avx512),
            ForwardPath::Reference => None,
        }
    }
}

/// `c = a·b + beta·c` for row-major `a [m,k]` (row stride `lda`), `b [k,n]`, `c [m,n]`.
fn gemm(
    a: &[f32],
    lda: usize,
    b: &[f32],
    c: &mut [f32],
    (m, k, n): (usize, usize, usize),
    beta: f32,
) {
    assert!(
        lda >= k
            && (m == 0 || a.len() >= (m - 1) * lda + k)
            && b.len() >= k * n
            && c.len() >= m * n,
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
            lda as isize,
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
    /// Packed on first bf16 use.
    bf16: std::sync::OnceLock<PackedBf16>,
    /// Quantized on first int8 use, if `quantize`.
    int8: std::sync::OnceLock<PackedI8>,
    /// Whether the int8 path quantizes this layer (its inputs are hidden states); the others
    /// run in bf16 there (f32 without AVX512_BF16).
    quantize: bool,
    bias: Vec<f32>,
    input: usize,
    output: usize,
}

impl DenseW {
    fn new(kernel: Vec<f32>, bias: Vec<f32>, input: usize, output: usize, quantize: bool) -> Self {
        let packed = Packed::new(&kernel, input, output);
        DenseW {
            kernel,
            packed,
            bf16: std::sync::OnceLock::new(),
            int8: std::sync::OnceLock::new(),
            quantize,
            bias,
            input,
            output,
        }
    }

    /// `out [rows, output] = x [rows, input] · kernel + bias`, `x` with row stride `ldx`.
    fn apply(&self, x: &[f32], ldx: usize, rows: usize, out: &mut [f32], path: ForwardPath) {
        let out = &mut out[..rows * self.output];
        match path {
            ForwardPath::Kernel(isa) => {
                kernel::matmul_bias(isa, x, rows, ldx, &self.packed, &self.bias, out)
            }
            ForwardPath::Bf16 => {
                let w = self
                    .bf16
                    .get_or_init(|| PackedBf16::new(&self.kernel, self.input, self.output));
                bf16::matmul_bias(x, rows, ldx, w, &self.bias, out)
            }
            ForwardPath::Int8 if self.quantize => {
                let w = self
                    .int8
                    .get_or_init(|| PackedI8::new(&self.kernel, self.input, self.output));
                int8::matmul_bias(x, rows, ldx, w, &self.bias, out)
            }
            ForwardPath::Int8 if bf16::available() => {
                let w = self
                    .bf16
                    .get_or_init(|| PackedBf16::new(&self.kernel, self.input, self.output));
                bf16::matmul_bias(x, rows, ldx, w, &self.bias, out)
            }
            ForwardPath::Int8 => {
                kernel::matmul_bias(Isa::Avx512, x, rows, ldx, &self.packed, &self.bias, out)
            }
            ForwardPath::Reference => {
                for row in out.chunks_exact_mut(self.output) {
                    row.copy_from_slice(&self.bias);
                }
                gemm(
                    x,
                    ldx,
                    &self.kernel,
                    out,
                    (rows, self.input, self.output),
                    1.0,
                )
            }
        }
    }
}

impl DenseW {
    /// [`DenseW::apply`] on the real rows of time-major `x [T, B]` only: step `t`'s real rows
    /// are its first `active[t]` (the batch is sorted longest window first), and `active` is
    /// non-decreasing (left padding). Padding rows of `out` are left as they were. Below
    /// [`PER_STEP_ROWS`] windows one product covers every row from the first step with a real
    /// one (one row a step would make 30 one-row products); above, one product a step until
    /// every window is real, then one for the remaining steps (full windows: one product, as
    /// without padding).
    fn apply_steps(
        &self,
        x: &[f32],
        ldx: usize,
        b: usize,
        active: &[usize],
        out: &mut [f32],
        path: ForwardPath,
    ) {
        let t_len = active.len();
        let t0 = active.iter().position(|&n| n > 0).unwrap_or(t_len);
        // From here on every row is real: one product over all of them.
        let full = if b < PER_STEP_ROWS {
            t0
        } else {
            active.iter().position(|&n| n == b).unwrap_or(t_len)
        };
        let o = self.output;
        for (t, &n) in active.iter().enumerate().take(full).skip(t0) {
            self.apply(&x[t * b * ldx..], ldx, n, &mut out[t * b * o..], path);
        }
        let rows = (t_len - full) * b;
        self.apply(
            &x[full * b * ldx..],
            ldx,
            rows,
            &mut out[full * b * o..],
            path,
        );
    }
}

/// From this many windows a batch's products run step by step on the real rows only.
const PER_STEP_ROWS: usize = 16;

#[derive(Debug, Clone)]
struct LstmW {
    input_w: DenseW,
    recurrent: Vec<f32>,
    recurrent_packed: Packed,
    recurrent_bf16: std::sync::OnceLock<PackedBf16>,
    recurrent_i8: std::sync::OnceLock<PackedI8>,
    /// Both kernels and the bias regrouped for the fused step ([`kernel::lstm_step`]); None
    /// when the hidden size is not a multiple of [`kernel::NR`].
    fused: Option<PackedLstm>,
    hidden: usize,
}

/// Where a layer reads its input and writes its hidden states: time-major rows `[T, B]`, row
/// `r` of `x` at `r * ldx` (its first `input` floats), hidden state of row `r` at
/// `r * ldo + col` in `out`. Writing straight into a wider buffer is how the BiLSTM's two
/// directions and the attention end up side by side in LSTM 2's input without copies.
struct Rows<'a> {
    x: &'a [f32],
    ldx: usize,
    ldo: usize,
    col: usize,
}

impl LstmW {
    /// Runs over `T` steps of `b` windows, sorted longest first so that step `t`'s real rows
    /// are its first `active[t]` (left padding: `active` is non-decreasing and `active[T-1]`
    /// is `b`). Only real rows are computed: a window's state starts at zero on its first real
    /// step (the forward direction) and is never read after its last (the backward one), so
    /// nothing carries over padding, and padding rows of `out` keep whatever they held (no
    /// later layer reads them: the attention masks them and LSTM 2 skips them too). `gx` and
    /// `c` are scratch.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        rows: Rows<'_>,
        b: usize,
        active: &[usize],
        reverse: bool,
        out: &mut [f32],
        gx: &mut Vec<f32>,
        c: &mut Vec<f32>,
        path: ForwardPath,
    ) {
        let t_len = active.len();
        let (h4, hd) = (4 * self.hidden, self.hidden);
        let c = scratch(c, b * hd);
        c.fill(0.0);
        if let (ForwardPath::Kernel(Isa::Avx512), Some(fused)) = (path, &self.fused)
            && b >= FUSED_STEP_ROWS
        {
            return fused_steps(fused, rows, b, active, reverse, out, c);
        }
        let Rows { x, ldx, ldo, col } = rows;
        // Input projections (bias included) of every real row up front: one product instead of
        // one a step.
        let row = |t: usize, i: usize| (t * b + i) * ldo + col;
        let gx = scratch(gx, t_len * b * h4);
        self.input_w.apply_steps(x, ldx, b, active, gx, path);
        for (t, n, prev) in real_steps(active, reverse) {
            let g = &mut gx[t * b * h4..(t * b + n) * h4];
            if let Some((p, np)) = prev {
                // The recurrent product of the rows that were real at the previous step (the
                // rest start here, from zero).
                let (h, m) = (&out[row(p, 0)..], n.min(np));
                match path {
                    ForwardPath::Kernel(isa) => {
                        kernel::matmul_acc(isa, h, m, ldo, &self.recurrent_packed, g)
                    }
                    ForwardPath::Reference => gemm(h, ldo, &self.recurrent, g, (m, hd, h4), 1.0),
                    ForwardPath::Bf16 => {
                        let w = self
                            .recurrent_bf16
                            .get_or_init(|| PackedBf16::new(&self.recurrent, hd, h4));
                        bf16::matmul_acc(h, m, ldo, w, g)
                    }
                    ForwardPath::Int8 => {
                        let w = self
                            .recurrent_i8
                            .get_or_init(|| PackedI8::new(&self.recurrent, hd, h4));
                        int8::matmul_acc(h, m, ldo, w, g)
                    }
                }
            }
            for i in 0..n {
                let o = row(t, i);
                let gi = &g[i * h4..(i + 1) * h4];
                let (hi, ci) = (&mut out[o..o + hd], &mut c[i * hd..(i + 1) * hd]);
                match path.isa() {
                    Some(isa) => kernel::lstm_cell(isa, gi, ci, hi),
                    None => {
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
        }
    }
}

/// The steps a layer computes, in its direction: `(t, n, prev)` for each step with real rows
/// (its first `n`), `prev` the step computed before it and that step's real rows.
fn real_steps(
    active: &[usize],
    reverse: bool,
) -> impl Iterator<Item = (usize, usize, Option<(usize, usize)>)> + '_ {
    let t_len = active.len();
    (0..t_len)
        .map(move |step| if reverse { t_len - 1 - step } else { step })
        .filter(|&t| active[t] > 0)
        .scan(None, |prev, t| {
            let before = prev.replace((t, active[t]));
            Some((t, active[t], before))
        })
}

/// [`LstmW::run`] (same arguments, `c` zeroed) one fused product and cell a step
/// ([`kernel::lstm_step`], AVX-512): a tile of rows' gates accumulate in registers and go
/// through the cell from there.
fn fused_steps(
    w: &PackedLstm,
    rows: Rows<'_>,
    b: usize,
    active: &[usize],
    reverse: bool,
    out: &mut [f32],
    c: &mut [f32],
) {
    let Rows { x, ldx, ldo, col } = rows;
    let row = |t: usize| t * b * ldo + col;
    let isa = Isa::Avx512;
    for (t, n, prev) in real_steps(active, reverse) {
        let xt = (&x[t * b * ldx..], ldx);
        match prev {
            Some((p, np)) => {
                // The previous step's rows lie wholly before (forward) or after (backward)
                // this step's.
                let (h, o) = if p < t {
                    let (lo, hi) = out.split_at_mut(row(t));
                    (&lo[row(p)..], hi)
                } else {
                    let (lo, hi) = out.split_at_mut(row(p));
                    (&*hi, &mut lo[row(t)..])
                };
                kernel::lstm_step(isa, xt, (h, ldo), (n.min(np), n), w, c, (o, ldo));
            }
            None => kernel::lstm_step(isa, xt, (&[], ldo), (0, n), w, c, (&mut out[row(t)..], ldo)),
        }
    }
}

/// One thread's buffers, kept between calls so scoring allocates nothing once warm.
#[derive(Default)]
struct Scratch {
    xs: Vec<f32>,
    gx: Vec<f32>,
    c: Vec<f32>,
    /// The backward direction's hidden states, gate inputs and cells when it runs on the helper.
    hb: Vec<f32>,
    gx_b: Vec<f32>,
    c_b: Vec<f32>,
    x2: Vec<f32>,
    qkv: Vec<f32>,
    hs2: Vec<f32>,
    hidden: Vec<f32>,
    window: kernel::AttentionScratch,
    /// The batch's windows, longest first, and each step's count of real rows.
    order: Vec<usize>,
    active: Vec<usize>,
    /// Scores in that order.
    sorted: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// The attention-LSTM's weights as plain vectors, for fast batched scoring.
#[derive(Debug, Clone)]
pub struct FastModel {
    cfg: ModelConfig,
    forward: LstmW,
    backward: LstmW,
    /// The attention's query, key and value projections side by side (`[seq, 3 * attention]`):
    /// one product reads LSTM 2's input rows once for all three.
    qkv: DenseW,
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
        // `quantize`: whether the int8 path quantizes the layer (inputs are hidden states).
        let dense = |p: &str, input: usize, output: usize, quantize: bool| {
            let (kernel, bias) = (
                take(w, &format!("{p}.kernel"))?,
                take(w, &format!("{p}.bias"))?,
            );
            if kernel.len() != input * output || bias.len() != output {
                return Err(candle_core::Error::Msg(format!("tensor {p}: wrong shape")));
            }
            Ok::<_, candle_core::Error>(DenseW::new(kernel, bias, input, output, quantize))
        };
        let lstm = |p: &str, input: usize, hidden: usize, quantize: bool| {
            let recurrent = take(w, &format!("{p}.recurrent_kernel"))?;
            if recurrent.len() != hidden * 4 * hidden {
                return Err(candle_core::Error::Msg(format!("tensor {p}: wrong shape")));
            }
            let input_w = dense(p, input, 4 * hidden, quantize)?;
            Ok::<_, candle_core::Error>(LstmW {
                fused: PackedLstm::new(&input_w.kernel, input, &recurrent, &input_w.bias, hidden),
                input_w,
                recurrent_packed: Packed::new(&recurrent, hidden, 4 * hidden),
                recurrent_bf16: std::sync::OnceLock::new(),
                recurrent_i8: std::sync::OnceLock::new(),
                recurrent,
                hidden,
            })
        };
        let seq = cfg.seq_width();
        Ok(FastModel {
            cfg: cfg.clone(),
            // The raw features' projections and the dense head (one step, a tenth of a
            // percent of the work) are not quantized on the int8 path.
            forward: lstm("bilstm_forward", cfg.input, cfg.lstm1, false)?,
            backward: lstm("bilstm_backward", cfg.input, cfg.lstm1, false)?,
            qkv: {
                let a = cfg.attention;
                let parts = ["query", "key", "value"]
                    .map(|p| dense(&format!("attention.{p}"), seq, a, true));
                let [q, k, v] = parts;
                let (q, k, v) = (q?, k?, v?);
                let kernel: Vec<f32> = (0..seq)
                    .flat_map(|r| [&q, &k, &v].map(|d| &d.kernel[r * a..(r + 1) * a]))
                    .flatten()
                    .copied()
                    .collect();
                let bias = [q.bias, k.bias, v.bias].concat();
                DenseW::new(kernel, bias, seq, 3 * a, true)
            },
            lstm2: lstm("lstm2", seq + cfg.attention, cfg.lstm2, true)?,
            dense: dense("dense", cfg.lstm2, cfg.dense, false)?,
            out: dense("output", cfg.dense, 1, false)?,
        })
    }

    /// Scores windows (each `window * input` floats, left-padded) with their real lengths.
    /// Returns the scores and, per window, the current transaction's attention weights.
    /// Both cores work on every call (a persistent helper thread, [`super::pool`]): batches of
    /// two or more are split in two halves (windows are independent, so the result is the
    /// same), a single window runs the BiLSTM's forward and backward directions side by side.
    pub fn predict(&self, windows: &[&[f32]], lens: &[usize]) -> (Vec<f32>, Vec<Vec<f32>>) {
        self.predict_on(windows, lens, ForwardPath::scoring())
    }

    /// [`FastModel::predict`] on the chosen implementation (the reference is the kernels'
    /// oracle).
    pub fn predict_on(
        &self,
        windows: &[&[f32]],
        lens: &[usize],
        path: ForwardPath,
    ) -> (Vec<f32>, Vec<Vec<f32>>) {
        let n = windows.len();
        let mut scores = vec![0f32; n];
        let mut attention = vec![Vec::new(); n];
        if n < SPLIT_BATCH {
            self.predict_one_thread(windows, lens, path, true, &mut scores, &mut attention);
            return (scores, attention);
        }
        let half = n / 2;
        let (s1, s2) = scores.split_at_mut(half);
        let (a1, a2) = attention.split_at_mut(half);
        pool::join(
            || self.predict_one_thread(&windows[..half], &lens[..half], path, false, s1, a1),
            || self.predict_one_thread(&windows[half..], &lens[half..], path, false, s2, a2),
        );
        (scores, attention)
    }

    /// Scores `windows` on this thread into `scores` and `attention` (one per window); with
    /// `helper`, a small batch's two BiLSTM directions run side by side on the helper thread
    /// (not when the helper already scores the other half of a split batch: the nested hand-off
    /// waited for it, which made batches of 64 to 127 windows slower than 63).
    #[allow(clippy::too_many_arguments)]
    fn predict_one_thread(
        &self,
        windows: &[&[f32]],
        lens: &[usize],
        path: ForwardPath,
        helper: bool,
        scores: &mut [f32],
        attention: &mut [Vec<f32>],
    ) {
        if windows.is_empty() {
            return;
        }
        // Sub-batches of at most SUB_BATCH windows, as even as possible.
        let parts = windows.len().div_ceil(SUB_BATCH);
        if parts > 1 {
            let size = windows.len().div_ceil(parts);
            let chunks = windows.chunks(size).zip(lens.chunks(size));
            let outs = scores.chunks_mut(size).zip(attention.chunks_mut(size));
            for ((w, l), (s, a)) in chunks.zip(outs) {
                self.predict_one_thread(w, l, path, helper, s, a);
            }
            return;
        }
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut s) => self.forward(windows, lens, path, helper, scores, attention, &mut s),
            // Re-entered on this thread (never in practice): fresh buffers.
            Err(_) => self.forward(
                windows,
                lens,
                path,
                helper,
                scores,
                attention,
                &mut Scratch::default(),
            ),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        windows: &[&[f32]],
        lens: &[usize],
        path: ForwardPath,
        helper: bool,
        scores: &mut [f32],
        attention: &mut [Vec<f32>],
        s: &mut Scratch,
    ) {
        let cfg = &self.cfg;
        let (t_len, b, f) = (cfg.window, windows.len(), cfg.input);
        let rows = t_len * b;
        // Longest window first: then each step's real rows are a prefix of the batch, and
        // every layer computes those alone (a stream's windows are short until its cards have
        // 30 transactions; computing their padding cost as much as full windows). Windows are
        // independent, so the order changes no score.
        let len = |i: usize| lens[i].clamp(1, t_len);
        let order = &mut s.order;
        order.clear();
        order.extend(0..b);
        order.sort_unstable_by_key(|&i| std::cmp::Reverse(len(i)));
        let active = &mut s.active;
        active.clear();
        active.extend((0..t_len).map(|t| order.partition_point(|&i| len(i) + t >= t_len)));
        let (order, active) = (&*order, &*active);
        // Time-major input [T, B, F], in that order.
        let xs = scratch(&mut s.xs, rows * f);
        for (pos, &i) in order.iter().enumerate() {
            let w = windows[i];
            for t in 0..t_len {
                xs[(t * b + pos) * f..(t * b + pos + 1) * f]
                    .copy_from_slice(&w[t * f..(t + 1) * f]);
            }
        }
        // LSTM 2's input rows [T, B, seq + attention]: the forward and backward hidden states
        // side by side, then the attention output, all written in place.
        let (h1, seq_w, a) = (cfg.lstm1, cfg.seq_width(), cfg.attention);
        let x2w = seq_w + a;
        let x2 = scratch(&mut s.x2, rows * x2w);
        if helper && b < SPLIT_BATCH {
            // The two directions at once: forward here, straight into LSTM 2's input; backward
            // on the helper into its own rows, copied in after.
            let hb = scratch(&mut s.hb, rows * h1);
            let (gx_b, c_b) = (&mut s.gx_b, &mut s.c_b);
            let xs = &*xs;
            pool::join(
                || {
                    let input = Rows {
                        x: xs,
                        ldx: f,
                        ldo: x2w,
                        col: 0,
                    };
                    let (gx, c) = (&mut s.gx, &mut s.c);
                    self.forward.run(input, b, active, false, x2, gx, c, path)
                },
                || {
                    let input = Rows {
                        x: xs,
                        ldx: f,
                        ldo: h1,
                        col: 0,
                    };
                    self.backward
                        .run(input, b, active, true, hb, gx_b, c_b, path)
                },
            );
            for (r, h) in hb.chunks_exact(h1).enumerate() {
                x2[r * x2w + h1..r * x2w + seq_w].copy_from_slice(h);
            }
        } else {
            for (reverse, lstm, col) in [(false, &self.forward, 0), (true, &self.backward, h1)] {
                let input = Rows {
                    x: xs,
                    ldx: f,
                    ldo: x2w,
                    col,
                };
                lstm.run(input, b, active, reverse, x2, &mut s.gx, &mut s.c, path);
            }
        }
        // Each row: its query, key and value side by side.
        let qkv = scratch(&mut s.qkv, rows * 3 * a);
        self.qkv.apply_steps(x2, x2w, b, active, qkv, path);
        for (i, &window) in order.iter().enumerate() {
            let first_real = t_len - len(window);
            let at = kernel::AttentionRows {
                q: qkv,
                k: &qkv[a..],
                v: &qkv[2 * a..],
                width: a,
                first: i * 3 * a,
                stride: b * 3 * a,
                steps: t_len,
                first_real,
            };
            let out = &mut x2[i * x2w + seq_w..];
            let last = &mut attention[window];
            last.resize(t_len, 0.0);
            match path.isa() {
                Some(isa) => kernel::attention(isa, &at, out, b * x2w, last, &mut s.window),
                None => reference_attention(&at, out, b * x2w, last),
            }
        }
        let h2 = cfg.lstm2;
        let hs2 = scratch(&mut s.hs2, rows * h2);
        let input = Rows {
            x: x2,
            ldx: x2w,
            ldo: h2,
            col: 0,
        };
        self.lstm2
            .run(input, b, active, false, hs2, &mut s.gx, &mut s.c, path);
        // Every window is real at the last step.
        let last = &hs2[(t_len - 1) * b * h2..];
        let hidden = scratch(&mut s.hidden, b * cfg.dense);
        self.dense.apply(last, h2, b, hidden, path);
        hidden.iter_mut().for_each(|x| *x = x.max(0.0));
        let sorted = scratch(&mut s.sorted, b);
        self.out.apply(hidden, cfg.dense, b, sorted, path);
        for (&i, &x) in order.iter().zip(sorted.iter()) {
            scores[i] = sigmoid(x);
        }
    }
}

/// Dot-product self-attention of one window (the notebook's: softmax of `q·k`, padding
/// masked), written as plainly as possible: the kernels' oracle.
fn reference_attention(
    at: &kernel::AttentionRows<'_>,
    out: &mut [f32],
    out_stride: usize,
    last: &mut [f32],
) {
    let (t_len, a) = (at.steps, at.width);
    let row = |m: &[f32], t: usize| {
        let o = at.first + t * at.stride;
        m[o..o + a].to_vec()
    };
    let mut weights = vec![0f32; t_len];
    for tq in at.first_real..t_len {
        let qv = row(at.q, tq);
        let mut max = f32::NEG_INFINITY;
        for (tk, w) in weights.iter_mut().enumerate() {
            *w = if tk < at.first_real {
                f32::NEG_INFINITY
            } else {
                qv.iter().zip(row(at.k, tk)).map(|(x, y)| x * y).sum()
            };
            max = max.max(*w);
        }
        let mut sum = 0.0;
        for w in weights.iter_mut() {
            *w = if *w == f32::NEG_INFINITY {
                0.0
            } else {
                (*w - max).exp()
            };
            sum += *w;
        }
        let o = &mut out[tq * out_stride..tq * out_stride + a];
        o.fill(0.0);
        for (tk, w) in weights.iter_mut().enumerate() {
            *w /= sum;
            if *w > 0.0 {
                o.iter_mut()
                    .zip(row(at.v, tk))
                    .for_each(|(o, x)| *o += *w * x);
            }
        }
    }
    last.copy_from_slice(&weights);
}
