//! Scoring kernels for these CPUs: a register-tiled matrix product over weights packed once at
//! load time, the LSTM cell's gates with vectorised activations, the two fused into one LSTM
//! step ([`lstm_step`]: the gates go from the product's registers through the cell) and the
//! attention on the same product, each compiled three times (AVX-512, AVX2+FMA, portable) and
//! chosen at run time ([`isa`]).
//!
//! Why not a general GEMM library: a scoring call multiplies a few rows (one per window in the
//! batch, at batch 1 a single row) by the same weights 30 times per layer. General GEMMs pack the
//! weight matrix on every call, which at batch 1 costs as much as the product itself; here the
//! weights are packed once, in column panels of [`NR`] that the kernel streams through, and the
//! activations are computed from polynomials the compiler vectorises (glibc's `expf` and
//! `tanhf` are scalar calls): the LSTM cell takes its tanh and sigmoids from one rational
//! interpolant, folded so a unit costs two divisions (see [`lstm_cell`]'s `cell`).
//!
//! Accuracy: [`exp`] is within 2 ulp of `f32::exp` on the range the network uses, the rational
//! tanh within 4e-7 of tanh, and the cell within 1e-6 of the textbook step (see the tests);
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
    pub(crate) fn require(self) {
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
#[derive(Debug, Clone, Default)]
pub struct Packed {
    data: Lines,
    k: usize,
    n: usize,
}

/// One cache line of floats (a panel row), aligned to its line.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([f32; NR]);

/// Floats in whole cache lines, starting on a line: a panel row is one aligned load. (A `Vec`'s
/// floats start wherever the allocator puts them, 16-byte aligned, and then every 64-byte load
/// of a panel row can straddle two lines: on a Skylake Xeon scoring at batch 256 ran at 3,436
/// windows/s instead of 3,980, medians of alternating runs.)
#[derive(Debug, Clone, Default)]
struct Lines {
    lines: Vec<Line>,
    len: usize,
}

impl Lines {
    /// `len` zeros, reusing the allocation.
    fn zeroed(&mut self, len: usize) {
        self.lines.clear();
        self.lines.resize(len.div_ceil(NR), Line::default());
        self.len = len;
    }
}

impl std::ops::Deref for Lines {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: a `Line` is `NR` floats with no padding (`repr(C)`, 64 bytes), so the lines
        // are `lines.len() * NR` initialised, contiguous floats, and `len` is at most that.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<f32>(), self.len) }
    }
}

impl std::ops::DerefMut for Lines {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, and `self` is borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<f32>(), self.len) }
    }
}

impl Packed {
    /// Packs row-major `w [k, n]`.
    pub fn new(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "packed matrix shape");
        let panels = n.div_ceil(NR);
        let mut data = Lines::default();
        data.zeroed(panels * k * NR);
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
    product(isa, a, m, lda, w, None, out)
}

/// `out [m, n] = bias + a [m, k] · w` (shapes as [`matmul_acc`], `bias` of `w.n()` floats):
/// the accumulators start from the bias and are stored, so `out` is written once and never
/// read (a layer's input projection fills megabytes; filling them with the bias first and
/// adding to them after cost a twentieth of scoring's time).
pub fn matmul_bias(
    isa: Isa,
    a: &[f32],
    m: usize,
    lda: usize,
    w: &Packed,
    bias: &[f32],
    out: &mut [f32],
) {
    assert_eq!(bias.len(), w.n, "bias length");
    product(isa, a, m, lda, w, Some(bias), out)
}

/// Panics unless `a` holds `m` rows of `k` floats at row stride `lda` and `out` holds `m` rows
/// of `n`: the bounds every product (f32, bf16, int8) relies on before unchecked reads.
pub(crate) fn check_shapes(a: &[f32], m: usize, lda: usize, k: usize, n: usize, out: &[f32]) {
    assert!(
        lda >= k && (m == 0 || a.len() >= (m - 1) * lda + k),
        "matmul input shape"
    );
    assert!(out.len() >= m * n, "matmul output shape");
}

fn product(
    isa: Isa,
    a: &[f32],
    m: usize,
    lda: usize,
    w: &Packed,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    check_shapes(a, m, lda, w.k, w.n, out);
    isa.require();
    match isa {
        // SAFETY: the CPU has the features (checked by `isa`).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { matmul_avx512(a, m, lda, w, bias, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { matmul_avx2(a, m, lda, w, bias, out) },
        _ => matmul::<Portable, 4, 1>(a, m, lda, w, bias, out),
    }
}

/// AVX-512's register tile: rows x panels accumulators (24 of 32 registers), the rest for the
/// panels' loads and the broadcast; its loop a function of its own (`Lanes::tile_apart`). Four
/// panels instead of two load a broadcast row value for four panels: on the Skylake Xeon batch
/// 256 scored 4,460 against 4,230 windows/s with two (six alternating runs, every one faster).
const AVX512_ROWS: usize = 6;
const AVX512_PANELS: usize = 4;
/// AVX2's: each panel takes two of its 16 registers.
const AVX2_ROWS: usize = 6;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn matmul_avx512(
    a: &[f32],
    m: usize,
    lda: usize,
    w: &Packed,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    matmul::<x86::Avx512, AVX512_ROWS, AVX512_PANELS>(a, m, lda, w, bias, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn matmul_avx2(
    a: &[f32],
    m: usize,
    lda: usize,
    w: &Packed,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    matmul::<x86::Avx2, AVX2_ROWS, 1>(a, m, lda, w, bias, out)
}

/// Single-precision FLOP/s one thread reaches with nothing but independent fused multiply-adds
/// on `isa` (12 chains over one `NR`-float operand, as the matrix kernels use it), measured over
/// about `seconds`: the hardware limit the kernels are compared with.
pub fn fma_peak_flops(isa: Isa, seconds: f64) -> f64 {
    isa.require();
    let began = std::time::Instant::now();
    let mut flops = 0f64;
    let mut sink = 0f32;
    while began.elapsed().as_secs_f64() < seconds {
        const ITERS: usize = 1 << 20;
        let w = std::hint::black_box([0.999_f32; NR]);
        let s = std::hint::black_box(1.0001_f32);
        sink += match isa {
            // SAFETY: the CPU has the features (checked above).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { peak_avx512(s, &w, ITERS) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => unsafe { peak_avx2(s, &w, ITERS) },
            _ => peak::<Portable>(s, &w, ITERS),
        };
        // 12 chains of NR lanes, two FLOPs (a multiply and an add) per lane.
        flops += (ITERS * 12 * NR * 2) as f64;
    }
    std::hint::black_box(sink);
    flops / began.elapsed().as_secs_f64()
}

/// Single-precision FLOP/s one thread reaches in a large product (`[512, 512] · [512, 512]`,
/// accumulated, with these kernels on `isa`) over about `seconds`: what a GEMM gets here, the
/// practical bound below [`fma_peak_flops`] (the register tile's loads and stores cost a few
/// percent).
pub fn gemm_peak_flops(isa: Isa, seconds: f64) -> f64 {
    const M: usize = 512;
    let a: Vec<f32> = (0..M * M).map(|i| (i % 97) as f32 / 97.0 - 0.5).collect();
    let w = Packed::new(&a, M, M);
    let mut out = vec![0f32; M * M];
    let began = std::time::Instant::now();
    let mut flops = 0f64;
    while began.elapsed().as_secs_f64() < seconds {
        matmul_acc(isa, &a, M, M, &w, &mut out);
        flops += (2 * M * M * M) as f64;
    }
    std::hint::black_box(&out);
    flops / began.elapsed().as_secs_f64()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn peak_avx512(s: f32, w: &[f32; NR], iters: usize) -> f32 {
    peak::<x86::Avx512>(s, w, iters)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn peak_avx2(s: f32, w: &[f32; NR], iters: usize) -> f32 {
    peak::<x86::Avx2>(s, w, iters)
}

#[inline(always)]
fn peak<L: Lanes>(s: f32, w: &[f32; NR], iters: usize) -> f32 {
    // SAFETY (all `L` calls): only inside a function compiled for `L`'s instruction set.
    let mut acc = [unsafe { L::zero() }; 12];
    // Distinct starting values, so the compiler cannot merge identical chains.
    for (i, a) in acc.iter_mut().enumerate() {
        unsafe { L::axpy(a, std::hint::black_box(i as f32), w) };
    }
    for _ in 0..iters {
        for a in acc.iter_mut() {
            unsafe { L::axpy(a, s, w) };
        }
    }
    let mut out = [0f32; NR];
    for a in &acc {
        unsafe { L::add_to(a, &mut out) };
    }
    // Every lane is used, so no lane's work is dead code.
    out.iter().sum()
}

/// One panel row's worth of accumulators (`NR` floats) in an instruction set's registers.
///
/// # Safety
/// The methods use that instruction set: call them only from code compiled for it (the
/// `#[target_feature]` functions above), where they are inlined.
trait Lanes {
    type Acc: Copy;
    /// Whether `a·b + c` is one fused instruction (see [`madd`]).
    const FUSED: bool;
    /// Zeroed accumulators.
    unsafe fn zero() -> Self::Acc;
    /// `acc += s · w`.
    unsafe fn axpy(acc: &mut Self::Acc, s: f32, w: &[f32; NR]);
    /// `out[j] += acc[j]` for the first `out.len()` (at most `NR`) lanes.
    unsafe fn add_to(acc: &Self::Acc, out: &mut [f32]);
    /// `x` (at most `NR` floats) in the first lanes, zero in the rest.
    #[inline(always)]
    unsafe fn load(x: &[f32]) -> Self::Acc {
        let mut lanes = [0f32; NR];
        lanes[..x.len()].copy_from_slice(x);
        // SAFETY: the caller's, as for every method.
        let mut acc = unsafe { Self::zero() };
        unsafe { Self::axpy(&mut acc, 1.0, &lanes) };
        acc
    }
    /// `out[j] = acc[j]` for the first `out.len()` (at most `NR`) lanes.
    #[inline(always)]
    unsafe fn store(acc: &Self::Acc, out: &mut [f32]) {
        out.fill(0.0);
        // SAFETY: the caller's.
        unsafe { Self::add_to(acc, out) }
    }
    /// [`tile`] as a function of its own where the instruction set has one (AVX-512): a tile of
    /// 24 accumulators inlined into the fused step or a product's block shared the registers
    /// with the caller's values and spilled; on its own its loop holds every accumulator in a
    /// register.
    #[inline(always)]
    unsafe fn tile_apart<const R: usize, const Q: usize>(
        acc: &mut [[Self::Acc; Q]; R],
        rows: [&[f32]; R],
        panels: [&[[f32; NR]]; Q],
        k: usize,
    ) where
        Self: Sized,
    {
        // SAFETY: the caller's.
        unsafe { tile::<Self, R, Q>(acc, rows, panels, k) }
    }
}

/// Plain floats (the compiler vectorises what the build target allows), no FMA.
struct Portable;

impl Lanes for Portable {
    type Acc = [f32; NR];
    const FUSED: bool = false;
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
        const FUSED: bool = true;
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
        #[inline(always)]
        unsafe fn load(x: &[f32]) -> Self::Acc {
            let mut lanes = [0f32; NR];
            lanes[..x.len()].copy_from_slice(x);
            // SAFETY: 16 floats read from `lanes`.
            unsafe {
                [
                    _mm256_loadu_ps(lanes.as_ptr()),
                    _mm256_loadu_ps(lanes.as_ptr().add(8)),
                ]
            }
        }
        #[inline(always)]
        unsafe fn store(acc: &Self::Acc, out: &mut [f32]) {
            if out.len() == NR {
                // SAFETY: 16 floats written inside `out`.
                unsafe {
                    _mm256_storeu_ps(out.as_mut_ptr(), acc[0]);
                    _mm256_storeu_ps(out.as_mut_ptr().add(8), acc[1]);
                }
            } else {
                let mut lanes = [0f32; NR];
                unsafe {
                    _mm256_storeu_ps(lanes.as_mut_ptr(), acc[0]);
                    _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[1]);
                }
                out.copy_from_slice(&lanes[..out.len()]);
            }
        }
    }

    /// One AVX-512 register, fused multiply-add.
    pub struct Avx512;

    impl Lanes for Avx512 {
        type Acc = __m512;
        const FUSED: bool = true;
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
            let mask = (1u32 << out.len()).wrapping_sub(1) as u16;
            // SAFETY: masked loads and stores touch only the lanes inside `out`.
            unsafe {
                let sum = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out.as_ptr()), *acc);
                _mm512_mask_storeu_ps(out.as_mut_ptr(), mask, sum)
            }
        }
        #[inline(always)]
        unsafe fn load(x: &[f32]) -> Self::Acc {
            // Lanes past `x.len()` (at most NR) are masked: neither read nor set.
            let mask = (1u32 << x.len()).wrapping_sub(1) as u16;
            // SAFETY: a masked load reads only the lanes inside `x`.
            unsafe { _mm512_maskz_loadu_ps(mask, x.as_ptr()) }
        }
        #[inline(always)]
        unsafe fn store(acc: &Self::Acc, out: &mut [f32]) {
            let mask = (1u32 << out.len()).wrapping_sub(1) as u16;
            // SAFETY: a masked store writes only the lanes inside `out`.
            unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr(), mask, *acc) }
        }
        #[inline(always)]
        unsafe fn tile_apart<const R: usize, const Q: usize>(
            acc: &mut [[Self::Acc; Q]; R],
            rows: [&[f32]; R],
            panels: [&[[f32; NR]]; Q],
            k: usize,
        ) {
            // SAFETY: the caller runs on AVX-512 (the trait's contract).
            unsafe { tile_avx512::<R, Q>(acc, rows, panels, k) }
        }
    }

    /// [`tile`] for AVX-512, never inlined: the accumulators are copied into locals so that
    /// the loop keeps all of them in registers.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline(never)]
    unsafe fn tile_avx512<const R: usize, const Q: usize>(
        acc: &mut [[__m512; Q]; R],
        rows: [&[f32]; R],
        panels: [&[[f32; NR]]; Q],
        k: usize,
    ) {
        let mut local = *acc;
        // SAFETY: compiled for AVX-512.
        unsafe { super::tile::<Avx512, R, Q>(&mut local, rows, panels, k) };
        *acc = local;
    }
}

/// Rows in blocks of `R` against `Q` panels at a time (`R x Q` independent FMA chains, enough
/// to keep both FMA pipes busy through their latency), panels outermost so a panel group stays
/// in L1 while every row block passes over it; rows left over (small batches, batch 1 above all)
/// walk four panels at once instead, so their FMA chains stay independent too.
#[inline(always)]
fn matmul<L: Lanes, const R: usize, const Q: usize>(
    a: &[f32],
    m: usize,
    lda: usize,
    w: &Packed,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let (k, n) = (w.k, w.n);
    let panels = n.div_ceil(NR);
    let full_rows = m - m % R;
    let mut p = 0;
    while p < panels {
        let q = Q.min(panels - p);
        let mut r0 = 0;
        while r0 < full_rows {
            if q == Q {
                block::<L, R, Q>(a, r0, lda, k, &w.data, p, bias, out, n);
            } else {
                // Panels left over: in pairs, then one.
                let mut pp = p;
                while pp + 2 <= p + q && Q > 2 {
                    block::<L, R, 2>(a, r0, lda, k, &w.data, pp, bias, out, n);
                    pp += 2;
                }
                for pp in pp..p + q {
                    block::<L, R, 1>(a, r0, lda, k, &w.data, pp, bias, out, n);
                }
            }
            r0 += R;
        }
        p += q;
    }
    for r in full_rows..m {
        let row = &a[r * lda..r * lda + k];
        let mut p = 0;
        while p + 4 <= panels {
            row_panels::<L, 4>(row, k, &w.data, p, bias, out, r, n);
            p += 4;
        }
        while p < panels {
            row_panels::<L, 1>(row, k, &w.data, p, bias, out, r, n);
            p += 1;
        }
    }
}

/// `R` rows from `r0` times `Q` panels from `p`, accumulated in registers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block<L: Lanes, const R: usize, const Q: usize>(
    a: &[f32],
    r0: usize,
    lda: usize,
    k: usize,
    data: &[f32],
    p: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    n: usize,
) {
    let rows: [&[f32]; R] = std::array::from_fn(|r| &a[(r0 + r) * lda..(r0 + r) * lda + k]);
    let panels: [&[[f32; NR]]; Q] = std::array::from_fn(|q| {
        &data[(p + q) * k * NR..(p + q + 1) * k * NR]
            .as_chunks::<NR>()
            .0[..k]
    });
    // The output's lines this block adds to at the end: ask for them now, so they arrive
    // while the FMAs run (a step's gates were written long before and have left L1 and L2;
    // waiting for them at the end took a quarter of the kernel's time).
    for r in 0..R {
        for q in 0..Q {
            prefetch(&out[(r0 + r) * n + (p + q) * NR..]);
        }
    }
    // SAFETY (all `L` calls): `matmul` runs only inside a function compiled for `L`'s
    // instruction set (see `matmul_acc`).
    let mut acc: [[L::Acc; Q]; R] = std::array::from_fn(|r| {
        std::array::from_fn(|q| start::<L>(bias, p + q, n, &out[(r0 + r) * n..]))
    });
    if R * Q >= 16 {
        unsafe { L::tile_apart::<R, Q>(&mut acc, rows, panels, k) };
    } else {
        unsafe { tile::<L, R, Q>(&mut acc, rows, panels, k) };
    }
    for (r, acc) in acc.iter().enumerate() {
        for (q, acc) in acc.iter().enumerate() {
            let c0 = (p + q) * NR;
            let cols = NR.min(n - c0);
            let o = &mut out[(r0 + r) * n + c0..(r0 + r) * n + c0 + cols];
            unsafe { L::store(acc, o) };
        }
    }
}

/// `acc[r][q] += Σ rows[r][kk] · panels[q][kk]` over `kk < k`: the register tile's inner loop,
/// every product's and the fused step's. Raw pointers after one bounds check: with a slice
/// index per load the compiler kept bounds checks and row pointers reloaded from the stack in
/// the fused step's loop, instructions that compete with the FMAs for a Skylake core's four
/// issue slots a cycle.
///
/// # Safety
/// As [`Lanes`]' methods: only inside a function compiled for `L`'s instruction set.
#[inline(always)]
unsafe fn tile<L: Lanes, const R: usize, const Q: usize>(
    acc: &mut [[L::Acc; Q]; R],
    rows: [&[f32]; R],
    panels: [&[[f32; NR]]; Q],
    k: usize,
) {
    assert!(
        rows.iter().all(|r| r.len() >= k) && panels.iter().all(|p| p.len() >= k),
        "tile shapes"
    );
    let rows = rows.map(<[f32]>::as_ptr);
    let panels = panels.map(<[[f32; NR]]>::as_ptr);
    for kk in 0..k {
        for r in 0..R {
            // SAFETY: `kk < k`, within every row and panel (checked above).
            let s = unsafe { *rows[r].add(kk) };
            for q in 0..Q {
                // SAFETY: as above; the instruction set is the caller's promise.
                unsafe { L::axpy(&mut acc[r][q], s, &*panels[q].add(kk)) };
            }
        }
    }
}

/// The accumulators of panel `p` of an output row (`row`, `n` floats) before any product: the
/// bias, or what the row holds (the product then continues its sum: `matmul_acc` after
/// `matmul_bias` adds in the same order as one product over both, so an LSTM step's gates come
/// out bit for bit as in the fused step, [`lstm_step`], and a window scores the same whichever
/// path its batch takes).
#[inline(always)]
fn start<L: Lanes>(bias: Option<&[f32]>, p: usize, n: usize, row: &[f32]) -> L::Acc {
    let c0 = p * NR;
    let from = bias.unwrap_or(row);
    // SAFETY: as in `block`.
    unsafe { L::load(&from[c0..(c0 + NR).min(n)]) }
}

/// Asks the CPU to bring the cache lines of `x`'s first [`NR`] floats into L1 (a hint: no
/// effect on results, nothing on other architectures).
#[inline(always)]
pub(crate) fn prefetch(x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let len = x.len().min(NR);
        if len > 0 {
            // SAFETY: a prefetch never faults, and both addresses are inside `x`.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(x.as_ptr().cast());
                _mm_prefetch::<_MM_HINT_T0>(x[len - 1..].as_ptr().cast());
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// One row times `P` consecutive panels from `p`, accumulated in registers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn row_panels<L: Lanes, const P: usize>(
    row: &[f32],
    k: usize,
    data: &[f32],
    p: usize,
    bias: Option<&[f32]>,
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
    for q in 0..P {
        prefetch(&out[r * n + (p + q) * NR..]);
    }
    // SAFETY (all `L` calls): as in `block`.
    let mut acc: [[L::Acc; P]; 1] = [std::array::from_fn(|q| {
        start::<L>(bias, p + q, n, &out[r * n..])
    })];
    unsafe { tile::<L, 1, P>(&mut acc, [row], panels, k) };
    let [acc] = acc;
    for (q, acc) in acc.iter().enumerate() {
        let c0 = (p + q) * NR;
        let cols = NR.min(n - c0);
        unsafe { L::store(acc, &mut out[r * n + c0..r * n + c0 + cols]) };
    }
}

/// An LSTM layer's weights packed for [`lstm_step`]: the input and recurrent kernels' columns
/// regrouped so that every [`NR`] hidden units' four gates (input, forget, candidate, output)
/// are four consecutive panels, the bias likewise. Then one register tile holds whole units:
/// its accumulators are the gates the cell needs, and they go through the cell without ever
/// being stored.
#[derive(Debug, Clone)]
pub struct PackedLstm {
    input: Packed,
    recurrent: Packed,
    bias: Vec<f32>,
    hidden: usize,
}

impl PackedLstm {
    /// Packs row-major `input [k, 4·hidden]`, `recurrent [hidden, 4·hidden]` and `bias
    /// [4·hidden]` (Keras' gate order). None unless `hidden` is a positive multiple of [`NR`].
    pub fn new(
        input: &[f32],
        k: usize,
        recurrent: &[f32],
        bias: &[f32],
        hidden: usize,
    ) -> Option<Self> {
        if hidden == 0 || !hidden.is_multiple_of(NR) {
            return None;
        }
        let n = 4 * hidden;
        assert!(
            input.len() == k * n && recurrent.len() == hidden * n && bias.len() == n,
            "lstm weight shapes"
        );
        // Column `c` of the regrouped matrices is column `from(c)` of Keras'.
        let from = |c: usize| {
            let (unit, rest) = (c / (4 * NR), c % (4 * NR));
            (rest / NR) * hidden + unit * NR + rest % NR
        };
        let regroup = |w: &[f32], rows: usize| -> Vec<f32> {
            (0..rows)
                .flat_map(|r| (0..n).map(move |c| w[r * n + from(c)]))
                .collect()
        };
        Some(PackedLstm {
            input: Packed::new(&regroup(input, k), k, n),
            recurrent: Packed::new(&regroup(recurrent, hidden), hidden, n),
            bias: regroup(bias, 1),
            hidden,
        })
    }
}

/// One LSTM step of `n` rows (sorted so that the first `m` have a previous hidden state and the
/// rest start from zero state): each row's gates, `bias + x·W` plus `h·R` for the first `m`,
/// accumulate in registers and go straight through the cell, which updates `c [n, hidden]` in
/// place and writes the hidden state to `out` (row `r` at `r * ldo`). Row `r` reads `x[r * ldx..]`
/// and, if `r < m`, `h[r * ldh..]`. The gates never reach memory (one product instead of an
/// input projection, a recurrent product added to it and a cell pass over the result).
#[allow(clippy::too_many_arguments)]
pub fn lstm_step(
    isa: Isa,
    (x, ldx): (&[f32], usize),
    (h, ldh): (&[f32], usize),
    (m, n): (usize, usize),
    w: &PackedLstm,
    c: &mut [f32],
    (out, ldo): (&mut [f32], usize),
) {
    let hd = w.hidden;
    assert!(m <= n, "lstm step rows");
    check_shapes(x, n, ldx, w.input.k, 0, &[]);
    check_shapes(h, m, ldh, hd, 0, &[]);
    assert!(c.len() >= n * hd, "lstm step cells");
    assert!(
        ldo >= hd && (n == 0 || out.len() >= (n - 1) * ldo + hd),
        "lstm step output"
    );
    isa.require();
    let rows = StepRows { x, ldx, h, ldh, m };
    match isa {
        // SAFETY: the CPU has the features (checked by `isa`).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { step_avx512(&rows, n, w, c, out, ldo) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { step_avx2(&rows, n, w, c, out, ldo) },
        _ => step::<Portable, 1>(&rows, n, w, c, out, ldo),
    }
}

/// [`lstm_step`]'s inputs.
struct StepRows<'a> {
    x: &'a [f32],
    ldx: usize,
    h: &'a [f32],
    ldh: usize,
    m: usize,
}

/// The fused step's register tile: rows x one unit group's four panels, 24 of AVX-512's 32
/// registers, its loop a function of its own (`Lanes::tile_apart`: inlined into the step, 5 and
/// 6 rows spilled accumulators and ran slower than 4). Six rows load a panel row for six
/// windows instead of four: on the Skylake Xeon batch 256 scored 4,230 against 4,020 windows/s
/// with four (six alternating runs, every one faster). AVX2 holds one row's (8 of its 16
/// registers), which is why scoring keeps AVX2 on the separate products and cell.
const AVX512_STEP_ROWS: usize = 6;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn step_avx512(
    s: &StepRows<'_>,
    n: usize,
    w: &PackedLstm,
    c: &mut [f32],
    out: &mut [f32],
    ldo: usize,
) {
    step::<x86::Avx512, AVX512_STEP_ROWS>(s, n, w, c, out, ldo)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn step_avx2(
    s: &StepRows<'_>,
    n: usize,
    w: &PackedLstm,
    c: &mut [f32],
    out: &mut [f32],
    ldo: usize,
) {
    step::<x86::Avx2, 1>(s, n, w, c, out, ldo)
}

/// Unit groups outermost (a group's weights stay close while every row block passes), rows in
/// tiles of `R`; the rows left over go in one smaller tile, or two where a tile of one or two
/// rows would be left (`R + 1` and `R + 2` rows split in halves: a tile of one row is bound by
/// its loads). A tile that straddles the rows with and without a previous state goes one row
/// at a time.
#[inline(always)]
fn step<L: Lanes, const R: usize>(
    s: &StepRows<'_>,
    n: usize,
    w: &PackedLstm,
    c: &mut [f32],
    out: &mut [f32],
    ldo: usize,
) {
    for unit in 0..w.hidden / NR {
        let mut r = 0;
        while r < n {
            let take = tile_rows(n - r, R);
            if r < s.m && r + take > s.m {
                for r in r..r + take {
                    step_row::<L>(s, r, unit, w, c, out, ldo);
                }
            } else if take == R {
                step_tile::<L, R>(s, r, unit, w, c, out, ldo);
            } else {
                match take {
                    5 => step_tile::<L, 5>(s, r, unit, w, c, out, ldo),
                    4 => step_tile::<L, 4>(s, r, unit, w, c, out, ldo),
                    3 => step_tile::<L, 3>(s, r, unit, w, c, out, ldo),
                    2 => step_tile::<L, 2>(s, r, unit, w, c, out, ldo),
                    _ => step_row::<L>(s, r, unit, w, c, out, ldo),
                }
            }
            r += take;
        }
    }
}

/// How many of `left` rows the next tile of at most `most` rows takes: whole tiles while more
/// than one is left, except that `most + 1` and `most + 2` rows go as two halves (no tile of
/// one or two rows behind a full one).
fn tile_rows(left: usize, most: usize) -> usize {
    if left <= most || left >= most + 3 {
        left.min(most)
    } else {
        left.div_ceil(2).min(most)
    }
}

/// Rows `r0..r0 + R`, all with a previous state or none.
#[inline(always)]
fn step_tile<L: Lanes, const R: usize>(
    s: &StepRows<'_>,
    r0: usize,
    unit: usize,
    w: &PackedLstm,
    c: &mut [f32],
    out: &mut [f32],
    ldo: usize,
) {
    if r0 + R <= s.m {
        step_block::<L, R, true>(s, r0, unit, w, c, out, ldo);
    } else {
        step_block::<L, R, false>(s, r0, unit, w, c, out, ldo);
    }
}

#[inline(always)]
fn step_row<L: Lanes>(
    s: &StepRows<'_>,
    r: usize,
    unit: usize,
    w: &PackedLstm,
    c: &mut [f32],
    out: &mut [f32],
    ldo: usize,
) {
    if r < s.m {
        step_block::<L, 1, true>(s, r, unit, w, c, out, ldo);
    } else {
        step_block::<L, 1, false>(s, r, unit, w, c, out, ldo);
    }
}

/// Rows `r0..r0 + R`, hidden units `unit * NR..` : the gates in registers (from the bias, then
/// the input product, then the recurrent one if `REC`), then the cell.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn step_block<L: Lanes, const R: usize, const REC: bool>(
    s: &StepRows<'_>,
    r0: usize,
    unit: usize,
    w: &PackedLstm,
    c: &mut [f32],
    out: &mut [f32],
    ldo: usize,
) {
    let hd = w.hidden;
    let (n4, p) = (4 * hd, 4 * unit);
    fn panels(m: &Packed, p: usize) -> [&[[f32; NR]]; 4] {
        std::array::from_fn(|q| {
            &m.data[(p + q) * m.k * NR..(p + q + 1) * m.k * NR]
                .as_chunks::<NR>()
                .0[..m.k]
        })
    }
    for r in 0..R {
        prefetch(&c[(r0 + r) * hd + unit * NR..]);
    }
    // SAFETY (all `L` calls): `step` runs only inside a function compiled for `L`'s
    // instruction set (see `lstm_step`).
    let init: [L::Acc; 4] = std::array::from_fn(|q| start::<L>(Some(&w.bias), p + q, n4, &[]));
    let mut acc = [init; R];
    let ki = w.input.k;
    let (xr, xp): ([&[f32]; R], _) = (
        std::array::from_fn(|r| &s.x[(r0 + r) * s.ldx..(r0 + r) * s.ldx + ki]),
        panels(&w.input, p),
    );
    // Tiles of four rows and more on their own (see `Lanes::tile_apart`); smaller ones,
    // batch 1's above all, inline.
    let product = |acc: &mut [[L::Acc; 4]; R], rows, panels, k| {
        if R >= 4 {
            unsafe { L::tile_apart::<R, 4>(acc, rows, panels, k) }
        } else {
            unsafe { tile::<L, R, 4>(acc, rows, panels, k) }
        }
    };
    product(&mut acc, xr, xp, ki);
    if REC {
        let hr: [&[f32]; R] =
            std::array::from_fn(|r| &s.h[(r0 + r) * s.ldh..(r0 + r) * s.ldh + hd]);
        product(&mut acc, hr, panels(&w.recurrent, p), hd);
    }
    for (r, acc) in acc.iter().enumerate() {
        let mut g = [0f32; 4 * NR];
        for (q, acc) in acc.iter().enumerate() {
            unsafe { L::store(acc, &mut g[q * NR..(q + 1) * NR]) };
        }
        let row = r0 + r;
        let cr = &mut c[row * hd + unit * NR..row * hd + (unit + 1) * NR];
        let hr = &mut out[row * ldo + unit * NR..row * ldo + (unit + 1) * NR];
        if L::FUSED {
            cell::<true>(&g, cr, hr)
        } else {
            cell::<false>(&g, cr, hr)
        }
    }
}

/// `e^x` from a degree-6 polynomial on `[-ln2/2, ln2/2]` and the exponent bits: branch-free and
/// without float-to-int conversions (Rust's saturating `as` does not vectorise), so loops over
/// it vectorise. Inputs are clamped to `[-87, 87]` (the network never needs more).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to the nearest integer (the float has no bits below 1 there).
    const ROUND: f32 = 12_582_912.0;
    // 2^23 + 127: the float's low mantissa bits are then n + 127, the biased exponent of 2^n.
    const BIAS: f32 = 8_388_735.0;
    let x = x.clamp(-87.0, 87.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    // Cephes expf coefficients.
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let y = p * r * r + r + 1.0;
    // n + 127 is in [1, 253], so shifted by 23 it is exactly 2^n's bits (the bits of 2^23
    // above it shift out).
    let scale = f32::from_bits((n + BIAS).to_bits() << 23);
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
        _ => cell::<false>(g, c, h),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn cell_avx512(g: &[f32], c: &mut [f32], h: &mut [f32]) {
    cell::<true>(g, c, h)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn cell_avx2(g: &[f32], c: &mut [f32], h: &mut [f32]) {
    cell::<true>(g, c, h)
}

/// `a·b + c`, fused where the instruction set has FMA (`FUSED`; elsewhere `mul_add` would be
/// a libm call).
#[inline(always)]
fn madd<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FUSED { a.mul_add(b, c) } else { a * b + c }
}

/// `tanh(x)` as a ratio `p / q` (`q` in `[0.0049, 1.6]`): Eigen's 13/6-degree rational
/// interpolant, within a couple of ulp on `[-9, 9]`; outside it tanh is ±1 in single
/// precision, so `x` is clamped there. Returned as a pair so the cell can fold several
/// activations into one division.
#[inline(always)]
fn tanh_ratio<const FUSED: bool>(x: f32) -> (f32, f32) {
    let x = x.clamp(-9.0, 9.0);
    let x2 = x * x;
    let m = madd::<FUSED>;
    let mut p = m(x2, -2.760_768_5e-16, 2.000_188e-13);
    p = m(x2, p, -8.604_672e-11);
    p = m(x2, p, 5.122_297e-8);
    p = m(x2, p, 1.485_722_4e-5);
    p = m(x2, p, 6.372_619_3e-4);
    p = m(x2, p, 4.893_524_6e-3);
    let mut q = m(x2, 1.198_258_4e-6, 1.185_347_1e-4);
    q = m(x2, q, 2.268_434_6e-3);
    q = m(x2, q, 4.893_525e-3);
    (x * p, q)
}

/// The LSTM step on rational activations with two divisions per unit instead of five. With
/// `tanh(x) = p/q`, `sigmoid(x) = (q + p) / 2q` at `x/2`, so `sigmoid(i)·tanh(g) = b / a` with
/// `a = 2·q_i·q_g`, `b = (q_i + p_i)·p_g`, and `h = sigmoid(o)·tanh(c') = (q_o + p_o)·p_c /
/// (2·q_o·q_c)`. The forget gate multiplies the cell, which can be large, so it keeps the
/// relative accuracy of `1 / (1 + e^-f)` near zero (`(q + p)` cancels there):
/// `c' = c / (1 + e^-f) + b / a = (c·a + b·(1 + e^-f)) / (a·(1 + e^-f))`, with `f` clamped
/// at -40 (where the forget gate is 4e-18) so the products stay finite. Every `q` is in
/// `[0.0049, 1.6]`. Within 1e-6 of the textbook step, saturated gates and large cells
/// included (test below).
#[inline(always)]
fn cell<const FUSED: bool>(g: &[f32], c: &mut [f32], h: &mut [f32]) {
    let hd = c.len();
    assert!(h.len() == hd && g.len() == 4 * hd, "lstm cell shapes");
    let (gi, rest) = g.split_at(hd);
    let (gf, rest) = rest.split_at(hd);
    let (gc, go) = rest.split_at(hd);
    let m = madd::<FUSED>;
    for j in 0..hd {
        let (pi, qi) = tanh_ratio::<FUSED>(0.5 * gi[j]);
        let (pg, qg) = tanh_ratio::<FUSED>(gc[j]);
        let (a, b) = (2.0 * qi * qg, (qi + pi) * pg);
        let forget = 1.0 + exp(-gf[j].max(-40.0));
        let cj = m(c[j], a, b * forget) / (a * forget);
        c[j] = cj;
        let (po, qo) = tanh_ratio::<FUSED>(0.5 * go[j]);
        let (pt, qt) = tanh_ratio::<FUSED>(cj);
        h[j] = (qo + po) * pt / (2.0 * qo * qt);
    }
}

/// One window's attention inputs inside time-major `[T, B, width]` matrices: step `t` of the
/// window at `first + t * stride` in `q`, `k` and `v`; steps before `first_real` are padding.
pub struct AttentionRows<'a> {
    /// Queries.
    pub q: &'a [f32],
    /// Keys.
    pub k: &'a [f32],
    /// Values.
    pub v: &'a [f32],
    /// Floats per step (the attention width).
    pub width: usize,
    /// Offset of step 0.
    pub first: usize,
    /// Floats from one step to the next.
    pub stride: usize,
    /// Steps in the window.
    pub steps: usize,
    /// The first real (unpadded) step.
    pub first_real: usize,
}

/// Buffers [`attention`] reuses between windows.
#[derive(Debug, Default)]
pub struct AttentionScratch {
    /// The real keys transposed, packed as the scores' right operand (`[width, keys]`).
    kt: Packed,
    /// The real values, packed as the weighted sums' right operand (`[keys, width]`, the keys
    /// padded with zero rows to the scores' row width).
    v: Packed,
    /// Scores, then weights: a row of `keys` rounded up to [`NR`] per real query.
    s: Vec<f32>,
    /// The weighted sums, a row of `width` per real query.
    o: Vec<f32>,
    /// Zeros: the products start from them (stored, never added to what was there).
    zero: Vec<f32>,
}

/// Dot-product self-attention of one window: for each real step `tq`, the softmax over real
/// steps of `q[tq]·k[tk]`, and `out[tq * out_stride..][..width]` = the weighted sum of `v`
/// (padding steps' rows of `out` are left as they were); `last` gets the last step's weights.
/// Both products are the register-tiled kernel's: the real queries times the transposed keys
/// (packed once per window), then the weights times the values; the softmax runs over rows of
/// whole lane groups.
pub fn attention(
    isa: Isa,
    at: &AttentionRows<'_>,
    out: &mut [f32],
    out_stride: usize,
    last: &mut [f32],
    scratch: &mut AttentionScratch,
) {
    let (t, a) = (at.steps, at.width);
    assert!(
        t > 0 && at.first_real < t && last.len() == t,
        "attention shapes"
    );
    assert!(
        [at.q, at.k, at.v]
            .iter()
            .all(|m| m.len() >= at.first + (t - 1) * at.stride + a)
            && out.len() >= (t - 1) * out_stride + a,
        "attention rows"
    );
    isa.require();
    match isa {
        // SAFETY: the CPU has the features (checked by `isa`).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { attend_avx512(at, out, out_stride, last, scratch) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { attend_avx2(at, out, out_stride, last, scratch) },
        _ => attend::<Portable, 4, 1>(at, out, out_stride, last, scratch),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn attend_avx512(
    at: &AttentionRows<'_>,
    out: &mut [f32],
    out_stride: usize,
    last: &mut [f32],
    scratch: &mut AttentionScratch,
) {
    attend::<x86::Avx512, AVX512_ROWS, AVX512_PANELS>(at, out, out_stride, last, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(
    at: &AttentionRows<'_>,
    out: &mut [f32],
    out_stride: usize,
    last: &mut [f32],
    scratch: &mut AttentionScratch,
) {
    attend::<x86::Avx2, AVX2_ROWS, 1>(at, out, out_stride, last, scratch)
}

#[inline(always)]
fn attend<L: Lanes, const R: usize, const Q: usize>(
    at: &AttentionRows<'_>,
    out: &mut [f32],
    out_stride: usize,
    last: &mut [f32],
    scratch: &mut AttentionScratch,
) {
    let (t, a, real) = (at.steps, at.width, at.first_real);
    // Real steps (queries and keys alike), and a score row's width.
    let (n, np) = (t - real, (t - real).next_multiple_of(NR));
    let row = |i: usize| at.first + (real + i) * at.stride;
    let AttentionScratch { kt, v, s, o, zero } = scratch;
    // The keys transposed into panels of NR keys: panel p, row j holds k[p*NR..][..NR][j].
    kt.data.zeroed(np * a);
    (kt.k, kt.n) = (a, np);
    for i in 0..n {
        let (p, lane) = (i / NR, i % NR);
        let k = &at.k[row(i)..][..a];
        for (j, &x) in k.iter().enumerate() {
            kt.data[(p * a + j) * NR + lane] = x;
        }
    }
    // The values in panels of NR columns, zero rows past the real keys.
    v.data.zeroed(a.div_ceil(NR) * np * NR);
    (v.k, v.n) = (np, a);
    for i in 0..n {
        let x = &at.v[row(i)..][..a];
        for (p, chunk) in x.chunks(NR).enumerate() {
            v.data[(p * np + i) * NR..][..chunk.len()].copy_from_slice(chunk);
        }
    }
    if zero.len() < np.max(a) {
        zero.resize(np.max(a), 0.0);
    }
    // Scores of the real queries against every real key.
    let s = self::scratch(s, n * np);
    let q = &at.q[at.first + real * at.stride..];
    matmul::<L, R, Q>(q, n, at.stride, kt, Some(&zero[..np]), s);
    for w in s.chunks_exact_mut(np) {
        softmax(w, n);
    }
    // Padding weighs nothing.
    last[..real].fill(0.0);
    last[real..].copy_from_slice(&s[(n - 1) * np..][..n]);
    let o = self::scratch(o, n * a);
    matmul::<L, R, Q>(s, n, np, v, Some(&zero[..a]), o);
    for (i, o) in o.chunks_exact(a).enumerate() {
        out[(real + i) * out_stride..][..a].copy_from_slice(o);
    }
}

/// `buf` as a slice of `n` floats, grown if needed; its contents are whatever was there (every
/// user overwrites what it reads).
pub(crate) fn scratch(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

/// The softmax of `w[..n]` in place, zero past `n` (`w.len()` a multiple of [`NR`]); maxima
/// and sums in [`NR`] lanes, so the loops vectorise.
#[inline(always)]
fn softmax(w: &mut [f32], n: usize) {
    for x in &mut w[n..] {
        *x = f32::NEG_INFINITY;
    }
    let mut max = [f32::NEG_INFINITY; NR];
    for chunk in w.as_chunks::<NR>().0 {
        for (m, &x) in max.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = max.into_iter().fold(f32::NEG_INFINITY, f32::max);
    for x in w.iter_mut() {
        // exp(-inf) would be clamped to e^-87, not zero: padding is set to zero outright.
        *x = if *x == f32::NEG_INFINITY {
            0.0
        } else {
            exp(*x - max)
        };
    }
    let mut sum = [0f32; NR];
    for chunk in w.as_chunks::<NR>().0 {
        for (s, &x) in sum.iter_mut().zip(chunk) {
            *s += x;
        }
    }
    let inv = 1.0 / sum.iter().sum::<f32>();
    for x in w.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn exp_sigmoid_and_both_tanhs_are_within_a_few_ulp_of_the_standard_library() {
        let mut worst = (0f64, 0f64, 0f64);
        let mut rational = 0f64;
        let mut x = -87.0f32;
        while x <= 87.0 {
            let (p, q) = tanh_ratio::<false>(x);
            rational = rational.max(((p / q) as f64 - (x as f64).tanh()).abs());
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
        assert!(rational < 4e-7, "rational tanh absolute error {rational}");
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
            let bias: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let want = naive(&a, m, k, &w, n);
            let packed = Packed::new(&w, k, n);
            // Every panel row is one aligned load, in the packing and in its copies.
            for p in [&packed, &packed.clone()] {
                assert_eq!(p.data.as_ptr() as usize % 64, 0, "panels off a cache line");
                assert_eq!(p.data.len(), n.div_ceil(NR) * k * NR, "packed length");
            }
            for isa in Isa::all_available() {
                let mut got = vec![0.5f32; m * n];
                matmul_acc(isa, &a, m, k, &packed, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - 0.5 - w).abs() < 1e-4,
                        "{} {m}x{k}x{n}: {g} vs {w} + 0.5",
                        isa.name()
                    );
                }
                // From the bias, over whatever `out` held (never read), and nothing written
                // past the m rows.
                let mut got = vec![f32::NAN; m * n + 1];
                matmul_bias(isa, &a, m, k, &packed, &bias, &mut got);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let b = bias[i % n];
                    assert!(
                        (g - b - w).abs() < 1e-4,
                        "{} {m}x{k}x{n} with bias: {g} vs {w} + {b}",
                        isa.name()
                    );
                }
                assert!(got[m * n].is_nan(), "wrote past the output");
            }
        }
    }

    /// The attention kernel against the textbook softmax attention, for widths that use every
    /// lane grouping (64, 16 + tail, 64 + 16 + tail, tail only), windows of 30 and 7 steps and
    /// several padding lengths, inside time-major matrices of 3 windows.
    #[test]
    fn the_attention_kernel_equals_the_textbook_softmax_attention() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (a, t) in [(64, 30), (21, 30), (83, 7), (5, 7)] {
            let (b, i) = (3, 1);
            let m: Vec<Vec<f32>> = (0..3)
                .map(|_| {
                    (0..t * b * a)
                        .map(|_| rng.random_range(-1.0..1.0))
                        .collect()
                })
                .collect();
            for first_real in [0, 1, t / 2, t - 1] {
                let at = AttentionRows {
                    q: &m[0],
                    k: &m[1],
                    v: &m[2],
                    width: a,
                    first: i * a,
                    stride: b * a,
                    steps: t,
                    first_real,
                };
                let at_row = |x: &[f32], s: usize| x[(s * b + i) * a..(s * b + i + 1) * a].to_vec();
                for isa in Isa::all_available() {
                    let stride = a + 2;
                    let mut out = vec![9f32; t * stride];
                    let mut last = vec![0f32; t];
                    attention(
                        isa,
                        &at,
                        &mut out,
                        stride,
                        &mut last,
                        &mut AttentionScratch::default(),
                    );
                    // Padding steps' query rows are left alone.
                    for tq in 0..first_real {
                        let row = &out[tq * stride..(tq + 1) * stride];
                        assert!(row.iter().all(|&x| x == 9.0), "wrote a padding row");
                    }
                    for tq in first_real..t {
                        let q = at_row(&m[0], tq);
                        let e: Vec<f64> = (0..t)
                            .map(|tk| {
                                let d: f32 =
                                    q.iter().zip(at_row(&m[1], tk)).map(|(x, y)| x * y).sum();
                                if tk < first_real {
                                    0.0
                                } else {
                                    (d as f64).exp()
                                }
                            })
                            .collect();
                        let sum: f64 = e.iter().sum();
                        for j in 0..a {
                            let want: f64 = (0..t)
                                .map(|tk| e[tk] / sum * at_row(&m[2], tk)[j] as f64)
                                .sum();
                            let got = out[tq * stride + j];
                            assert!(
                                (got as f64 - want).abs() < 1e-5,
                                "{} a={a} t={t} pad={first_real} [{tq},{j}]: {got} vs {want}",
                                isa.name()
                            );
                        }
                        assert_eq!(out[tq * stride + a], 9.0, "wrote past its row");
                        if tq == t - 1 {
                            for tk in 0..t {
                                assert!(
                                    (last[tk] as f64 - e[tk] / sum).abs() < 1e-6,
                                    "{} last weight {tk}",
                                    isa.name()
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_fused_cell_equals_the_textbook_lstm_step() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        // In f64: the activations' error is measured, not f32's own rounding of the reference.
        let s = |x: f64| 1.0 / (1.0 + (-x).exp());
        // The range gates take in practice, then far into saturation with large cells; 4,000
        // units each (every lane grouping, the remainders too).
        for (gates, cells) in [(6.0f32, 2.0f32), (30.0, 20.0)] {
            let hd = 4_003;
            let g: Vec<f32> = (0..4 * hd)
                .map(|_| rng.random_range(-gates..gates))
                .collect();
            let c0: Vec<f32> = (0..hd).map(|_| rng.random_range(-cells..cells)).collect();
            for isa in Isa::all_available() {
                let (mut c, mut h) = (c0.clone(), vec![0f32; hd]);
                lstm_cell(isa, &g, &mut c, &mut h);
                let mut worst = (0f64, 0f64);
                for j in 0..hd {
                    let at = |k: usize| g[k * hd + j] as f64;
                    let cj = s(at(1)) * c0[j] as f64 + s(at(0)) * at(2).tanh();
                    let hj = s(at(3)) * cj.tanh();
                    worst.0 = worst.0.max((c[j] as f64 - cj).abs() / cj.abs().max(1.0));
                    worst.1 = worst.1.max((h[j] as f64 - hj).abs());
                }
                assert!(
                    worst.0 < 1e-6 && worst.1 < 1e-6,
                    "{} gates ±{gates}: cell error {:e} (relative), hidden {:e}",
                    isa.name(),
                    worst.0,
                    worst.1
                );
            }
        }
    }

    /// The fused step against the separate input product, recurrent product and cell on Keras'
    /// gate order, for every tiling of the rows (1 to 13: full tiles, tails of one, two and three
    /// rows, a tail of one folded into 3 + 2), every split between rows with and without a
    /// previous state (tiles straddling it included), strided inputs and outputs, several
    /// hidden sizes; nothing written outside the hidden states' columns of the `n` rows.
    #[test]
    fn leftover_rows_never_go_one_at_a_time_behind_full_tiles() {
        for most in [1, 4, 6] {
            for n in 0..=40 {
                let (mut left, mut tiles) = (n, vec![]);
                while left > 0 {
                    let take = tile_rows(left, most);
                    assert!(
                        (1..=most).contains(&take),
                        "{n} rows, tiles of {most}: {take}"
                    );
                    tiles.push(take);
                    left -= take;
                }
                assert_eq!(tiles.iter().sum::<usize>(), n);
                // A single-row tile (bound by its loads) only for a single row; with AVX-512's
                // six rows a tile, none under three.
                let least = match most {
                    6 => n.min(3),
                    1 => 1,
                    _ => n.min(2),
                };
                assert!(
                    tiles.iter().all(|&t| t >= least),
                    "{n} rows, tiles of {most}: {tiles:?}"
                );
            }
        }
        assert_eq!(tile_rows(7, 6), 4);
        assert_eq!(tile_rows(8, 6), 4);
        assert_eq!(tile_rows(32, 6), 6);
        assert_eq!(tile_rows(5, 6), 5);
    }

    #[test]
    fn the_fused_lstm_step_equals_products_then_cell() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (k, hd) in [(30, 128), (5, 16), (40, 32)] {
            let n4 = 4 * hd;
            let mut rand = |len: usize, r: f32| -> Vec<f32> {
                (0..len).map(|_| rng.random_range(-r..r)).collect()
            };
            let (wi, wr, bias) = (rand(k * n4, 0.3), rand(hd * n4, 0.2), rand(n4, 0.5));
            let fused = PackedLstm::new(&wi, k, &wr, &bias, hd).expect("a multiple of NR");
            let (pi, pr) = (Packed::new(&wi, k, n4), Packed::new(&wr, hd, n4));
            let (ldx, ldh, ldo) = (k + 3, hd + 5, hd + 7);
            let x = rand(13 * ldx, 2.0);
            let h = rand(13 * ldh, 1.0);
            let c0 = rand(13 * hd, 3.0);
            for n in 1..=13 {
                for m in 0..=n {
                    for isa in Isa::all_available() {
                        // Reference: the gates in memory, then the cell row by row, on the same
                        // instruction set: the fused step must give the same bits.
                        let mut g = vec![0f32; n * n4];
                        matmul_bias(isa, &x, n, ldx, &pi, &bias, &mut g);
                        matmul_acc(isa, &h, m, ldh, &pr, &mut g);
                        let (mut c_want, mut h_want) = (c0[..n * hd].to_vec(), vec![0f32; n * hd]);
                        for r in 0..n {
                            lstm_cell(
                                isa,
                                &g[r * n4..(r + 1) * n4],
                                &mut c_want[r * hd..(r + 1) * hd],
                                &mut h_want[r * hd..(r + 1) * hd],
                            );
                        }
                        let mut c = c0[..n * hd].to_vec();
                        let mut out = vec![f32::NAN; n * ldo];
                        lstm_step(
                            isa,
                            (&x, ldx),
                            (&h, ldh),
                            (m, n),
                            &fused,
                            &mut c,
                            (&mut out, ldo),
                        );
                        for r in 0..n {
                            for j in 0..ldo {
                                let got = out[r * ldo + j];
                                if j >= hd {
                                    assert!(got.is_nan(), "wrote past row {r}'s hidden state");
                                    continue;
                                }
                                let (hw, cw, cg) =
                                    (h_want[r * hd + j], c_want[r * hd + j], c[r * hd + j]);
                                assert!(
                                    got.to_bits() == hw.to_bits() && cg.to_bits() == cw.to_bits(),
                                    "{} k {k} hidden {hd} n {n} m {m} row {r} unit {j}: h {got} vs {hw}, c {cg} vs {cw}",
                                    isa.name()
                                );
                            }
                        }
                    }
                }
            }
        }
        assert!(
            PackedLstm::new(&[0.0; 4 * 24], 1, &[0.0; 24 * 24 * 4], &[0.0; 24 * 4], 24).is_none()
        );
    }
}
