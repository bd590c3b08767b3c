//! Scoring kernels for these CPUs: a register-tiled matrix product over weights packed once at
//! load time, and the LSTM cell's gates with vectorised activations, each compiled three times
//! (AVX-512, AVX2+FMA, portable) and chosen at run time ([`isa`]).
//!
//! Why not a general GEMM library: a scoring call multiplies a few rows (one per window in the
//! batch, at batch 1 a single row) by the same weights 30 times per layer. General GEMMs pack the
//! weight matrix on every call, which at batch 1 costs as much as the product itself; here the
//! weights are packed once, in column panels of [`NR`] that the kernel streams through, and the
//! activations are computed from one polynomial `exp` the compiler vectorises (glibc's `expf` and
//! `tanhf` are scalar calls).
//!
//! Accuracy: [`exp`] is within 2 ulp of `f32::exp` on the range the network uses (see the tests);
//! the FMA variants round differently from the portable one by at most a few ulp per product, so
//! scores agree with the reference forward within 1e-6.

use std::sync::OnceLock;

/// Columns per packed panel (one AVX-512 register, two AVX2 registers of f32).
pub const NR: usize = 16;

/// The instruction set the kernels run with on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F (with AVX2 and FMA).
    Avx512,
    /// AVX2 with FMA.
    Avx2Fma,
    /// Anything else: plain Rust, vectorised as the build target allows.
    Portable,
}

impl Isa {
    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2Fma => "avx2+fma",
            Isa::Portable => "portable",
        }
    }
}

impl Isa {
    fn rank(self) -> u8 {
        match self {
            Isa::Portable => 0,
            Isa::Avx2Fma => 1,
            Isa::Avx512 => 2,
        }
    }

    /// Whether this CPU can run it.
    pub fn available(self) -> bool {
        static BEST: OnceLock<Isa> = OnceLock::new();
        self.rank() <= BEST.get_or_init(|| detect("")).rank()
    }

    /// Panics unless this CPU can run it (the kernels' safety check).
    fn require(self) {
        assert!(
            self.available(),
            "{} is not available on this CPU",
            self.name()
        );
    }

    /// Every instruction set this CPU can run, best first.
    pub fn all_available() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2Fma, Isa::Portable]
            .into_iter()
            .filter(|i| i.available())
            .collect()
    }
}

/// The instruction set scoring uses: the best this CPU has (detected once).
/// `FRAUDSTREAM_ISA=portable|avx2` caps it (to compare kernels, or to rule one out).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = std::env::var("FRAUDSTREAM_ISA").unwrap_or_default();
        detect(&cap)
    })
}

#[cfg(target_arch = "x86_64")]
fn detect(cap: &str) -> Isa {
    let avx2 =
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    let avx512 = avx2 && std::arch::is_x86_feature_detected!("avx512f");
    match cap {
        "portable" => Isa::Portable,
        "avx2" if avx2 => Isa::Avx2Fma,
        _ if avx512 => Isa::Avx512,
        _ if avx2 => Isa::Avx2Fma,
        _ => Isa::Portable,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect(_cap: &str) -> Isa {
    Isa::Portable
}

/// A `[k, n]` weight matrix packed in column panels: panel `p` holds columns `p*NR..p*NR+NR`
/// of every row, contiguous (`k * NR` floats), zero beyond column `n`.
#[derive(Debug, Clone)]
pub struct Packed {
    data: Vec<f32>,
    k: usize,
    n: usize,
}

impl Packed {
    /// Packs row-major `w [k, n]`.
    pub fn new(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "packed matrix shape");
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        for p in 0..panels {
            for kk in 0..k {
                for j in 0..NR.min(n - p * NR) {
                    data[(p * k + kk) * NR + j] = w[kk * n + p * NR + j];
                }
            }
        }
        Packed { data, k, n }
    }

    /// Rows.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns.
    pub fn n(&self) -> usize {
        self.n
    }
}

/// `out [m, n] += a [m, k] · w` (row-major `a` with row stride `lda`, `out` with row stride
/// `w.n()`), on instruction set `isa` (panics if this CPU lacks it).
pub fn matmul_acc(isa: Isa, a: &[f32], m: usize, lda: usize, w: &Packed, out: &mut [f32]) {
    assert!(
        lda >= w.k && (m == 0 || a.len() >= (m - 1) * lda + w.k),
        "matmul input shape"
    );
    assert!(out.len() >= m * w.n, "matmul output shape");
    isa.require();
    match isa {
        // SAFETY: the CPU has the features (checked by `isa`).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { matmul_avx512(a, m, lda, w, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { matmul_avx2(a, m, lda, w, out) },
        _ => matmul::<Portable, 4>(a, m, lda, w, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn matmul_avx512(a: &[f32], m: usize, lda: usize, w: &Packed, out: &mut [f32]) {
    matmul::<x86::Avx512, 4>(a, m, lda, w, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn matmul_avx2(a: &[f32], m: usize, lda: usize, w: &Packed, out: &mut [f32]) {
    matmul::<x86::Avx2, 4>(a, m, lda, w, out)
}

/// One panel row's worth of accumulators (`NR` floats) in an instruction set's registers.
///
/// # Safety
/// The methods use that instruction set: call them only from code compiled for it (the
/// `#[target_feature]` functions above), where they are inlined.
trait Lanes {
    type Acc: Copy;
    /// Zeroed accumulators.
    unsafe fn zero() -> Self::Acc;
    /// `acc += s · w`.
    unsafe fn axpy(acc: &mut Self::Acc, s: f32, w: &[f32; NR]);
    /// `out[j] += acc[j]` for the first `out.len()` (at most `NR`) lanes.
    unsafe fn add_to(acc: &Self::Acc, out: &mut [f32]);
}

/// Plain floats (the compiler vectorises what the build target allows), no FMA.
struct Portable;

impl Lanes for Portable {
    type Acc = [f32; NR];
    #[inline(always)]
    unsafe fn zero() -> Self::Acc {
        [0.0; NR]
    }
    #[inline(always)]
    unsafe fn axpy(acc: &mut Self::Acc, s: f32, w: &[f32; NR]) {
        for j in 0..NR {
            acc[j] += s * w[j];
        }
    }
    #[inline(always)]
    unsafe fn add_to(acc: &Self::Acc, out: &mut [f32]) {
        out.iter_mut().zip(acc).for_each(|(o, x)| *o += x);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Lanes, NR};
    use std::arch::x86_64::*;

    /// Two AVX2 registers, fused multiply-add.
    pub struct Avx2;

    impl Lanes for Avx2 {
        type Acc = [__m256; 2];
        #[inline(always)]
        unsafe fn zero() -> Self::Acc {
            unsafe { [_mm256_setzero_ps(); 2] }
        }
        #[inline(always)]
        unsafe fn axpy(acc: &mut Self::Acc, s: f32, w: &[f32; NR]) {
            unsafe {
                let s = _mm256_set1_ps(s);
                acc[0] = _mm256_fmadd_ps(s, _mm256_loadu_ps(w.as_ptr()), acc[0]);
                acc[1] = _mm256_fmadd_ps(s, _mm256_loadu_ps(w.as_ptr().add(8)), acc[1]);
            }
        }
        #[inline(always)]
        unsafe fn add_to(acc: &Self::Acc, out: &mut [f32]) {
            let mut lanes = [0f32; NR];
            unsafe {
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[1]);
            }
            out.iter_mut().zip(lanes).for_each(|(o, x)| *o += x);
        }
    }

    /// One AVX-512 register, fused multiply-add.
    pub struct Avx512;

    impl Lanes for Avx512 {
        type Acc = __m512;
        #[inline(always)]
        unsafe fn zero() -> Self::Acc {
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn axpy(acc: &mut Self::Acc, s: f32, w: &[f32; NR]) {
            unsafe {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(s), _mm512_loadu_ps(w.as_ptr()), *acc);
            }
        }
        #[inline(always)]
        unsafe fn add_to(acc: &Self::Acc, out: &mut [f32]) {
            let mut lanes = [0f32; NR];
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *acc) };
            out.iter_mut().zip(lanes).for_each(|(o, x)| *o += x);
        }
    }
}

/// Rows in blocks of `R` against one panel at a time; a block of fewer rows than `R` (small
/// batches, batch 1 above all) walks four panels at once instead, so the FMA chains stay
/// independent.
#[inline(always)]
fn matmul<L: Lanes, const R: usize>(a: &[f32], m: usize, lda: usize, w: &Packed, out: &mut [f32]) {
    let (k, n) = (w.k, w.n);
    let panels = n.div_ceil(NR);
    let mut r0 = 0;
    while r0 + R <= m {
        for p in 0..panels {
            let panel = &w.data[p * k * NR..(p + 1) * k * NR];
            block::<L, R>(a, r0, lda, k, panel, out, n, p);
        }
        r0 += R;
    }
    while r0 < m {
        let row = &a[r0 * lda..r0 * lda + k];
        let mut p = 0;
        while p + 4 <= panels {
            row_panels::<L, 4>(row, k, &w.data, p, out, r0, n);
            p += 4;
        }
        while p < panels {
            row_panels::<L, 1>(row, k, &w.data, p, out, r0, n);
            p += 1;
        }
        r0 += 1;
    }
}

/// `R` rows from `r0` times one panel `p`, accumulated in registers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block<L: Lanes, const R: usize>(
    a: &[f32],
    r0: usize,
    lda: usize,
    k: usize,
    panel: &[f32],
    out: &mut [f32],
    n: usize,
    p: usize,
) {
    let rows: [&[f32]; R] = std::array::from_fn(|r| &a[(r0 + r) * lda..(r0 + r) * lda + k]);
    let w = &panel.as_chunks::<NR>().0[..k];
    // SAFETY (all `L` calls): `matmul` runs only inside a function compiled for `L`'s
    // instruction set (see `matmul_acc`).
    let mut acc = [unsafe { L::zero() }; R];
    for (kk, wk) in w.iter().enumerate() {
        for r in 0..R {
            unsafe { L::axpy(&mut acc[r], rows[r][kk], wk) };
        }
    }
    let cols = NR.min(n - p * NR);
    for (r, acc) in acc.iter().enumerate() {
        let o = &mut out[(r0 + r) * n + p * NR..(r0 + r) * n + p * NR + cols];
        unsafe { L::add_to(acc, o) };
    }
}

/// One row times `P` consecutive panels from `p`, accumulated in registers.
#[inline(always)]
fn row_panels<L: Lanes, const P: usize>(
    row: &[f32],
    k: usize,
    data: &[f32],
    p: usize,
    out: &mut [f32],
    r: usize,
    n: usize,
) {
    let panels: [&[[f32; NR]]; P] = std::array::from_fn(|q| {
        &data[(p + q) * k * NR..(p + q + 1) * k * NR]
            .as_chunks::<NR>()
            .0[..k]
    });
    let row = &row[..k];
    // SAFETY (all `L` calls): as in `block`.
    let mut acc = [unsafe { L::zero() }; P];
    for (kk, &s) in row.iter().enumerate() {
        for q in 0..P {
            unsafe { L::axpy(&mut acc[q], s, &panels[q][kk]) };
        }
    }
    for (q, acc) in acc.iter().enumerate() {
        let c0 = (p + q) * NR;
        let cols = NR.min(n - c0);
        unsafe { L::add_to(acc, &mut out[r * n + c0..r * n + c0 + cols]) };
    }
}

/// `e^x` from a degree-6 polynomial on `[-ln2/2, ln2/2]` and the exponent bits: branch-free, so
/// loops over it vectorise. Inputs are clamped to `[-87, 87]` (the network never needs more).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 87.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    // Cephes expf coefficients.
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    y * scale
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `tanh(x) = 2·sigmoid(2x) − 1`.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    2.0 / (1.0 + exp(-2.0 * x)) - 1.0
}

/// One LSTM step for one window: gates `g [4h]` (input, forget, candidate, output, Keras'
/// order, pre-activation) update the cell `c [h]` and hidden state `h [h]` in one pass, on
/// instruction set `isa` (panics if this CPU lacks it).
pub fn lstm_cell(isa: Isa, g: &[f32], c: &mut [f32], h: &mut [f32]) {
    isa.require();
    match isa {
        // SAFETY: the CPU has the features (checked by `isa`).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { cell_avx512(g, c, h) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { cell_avx2(g, c, h) },
        _ => cell(g, c, h),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn cell_avx512(g: &[f32], c: &mut [f32], h: &mut [f32]) {
    cell(g, c, h)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn cell_avx2(g: &[f32], c: &mut [f32], h: &mut [f32]) {
    cell(g, c, h)
}

#[inline(always)]
fn cell(g: &[f32], c: &mut [f32], h: &mut [f32]) {
    let hd = c.len();
    assert!(h.len() == hd && g.len() == 4 * hd, "lstm cell shapes");
    let (gi, rest) = g.split_at(hd);
    let (gf, rest) = rest.split_at(hd);
    let (gc, go) = rest.split_at(hd);
    for j in 0..hd {
        let cj = sigmoid(gf[j]) * c[j] + sigmoid(gi[j]) * tanh(gc[j]);
        c[j] = cj;
        h[j] = sigmoid(go[j]) * tanh(cj);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn exp_sigmoid_and_tanh_are_within_a_few_ulp_of_the_standard_library() {
        let mut worst = (0f64, 0f64, 0f64);
        let mut x = -87.0f32;
        while x <= 87.0 {
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst.0 = worst.0.max(rel);
            if x.abs() < 30.0 {
                let s = 1.0 / (1.0 + (-(x as f64)).exp());
                worst.1 = worst.1.max((sigmoid(x) as f64 - s).abs());
                worst.2 = worst.2.max((tanh(x) as f64 - (x as f64).tanh()).abs());
            }
            x += 0.001_3;
        }
        assert!(worst.0 < 3e-7, "exp relative error {}", worst.0);
        assert!(worst.1 < 2e-7, "sigmoid absolute error {}", worst.1);
        assert!(worst.2 < 4e-7, "tanh absolute error {}", worst.2);
        assert_eq!(exp(-200.0), exp(-87.0), "clamped, never 0 or NaN");
        assert!(sigmoid(200.0) == 1.0 && tanh(-200.0) == -1.0);
    }

    /// Naive `a [m, k] · w [k, n]`.
    fn naive(a: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|kk| a[i * k + kk] * w[kk * n + j]).sum();
            }
        }
        out
    }

    #[test]
    fn the_packed_product_equals_the_naive_one_for_every_shape_the_network_uses() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for (m, k, n) in [
            (1, 128, 512),
            (3, 64, 256),
            (9, 30, 512),
            (17, 256, 64),
            (8, 64, 32),
            (5, 32, 1),
            (33, 20, 17),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let w: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let want = naive(&a, m, k, &w, n);
            for isa in Isa::all_available() {
                let mut got = vec![0.5f32; m * n];
                matmul_acc(isa, &a, m, k, &Packed::new(&w, k, n), &mut got);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - 0.5 - w).abs() < 1e-4,
                        "{} {m}x{k}x{n}: {g} vs {w} + 0.5",
                        isa.name()
                    );
                }
            }
        }
    }

    #[test]
    fn the_fused_cell_equals_the_textbook_lstm_step() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let hd = 40;
        let g: Vec<f32> = (0..4 * hd).map(|_| rng.random_range(-6.0..6.0)).collect();
        let c0: Vec<f32> = (0..hd).map(|_| rng.random_range(-2.0..2.0)).collect();
        let s = |x: f32| 1.0 / (1.0 + (-x).exp());
        for isa in Isa::all_available() {
            let (mut c, mut h) = (c0.clone(), vec![0f32; hd]);
            lstm_cell(isa, &g, &mut c, &mut h);
            for j in 0..hd {
                let cj = s(g[hd + j]) * c0[j] + s(g[j]) * g[2 * hd + j].tanh();
                assert!((c[j] - cj).abs() < 1e-6, "{} c[{j}]", isa.name());
                assert!(
                    (h[j] - s(g[3 * hd + j]) * cj.tanh()).abs() < 1e-6,
                    "{} h[{j}]",
                    isa.name()
                );
            }
        }
    }
}
