//! 8-bit integer products: weights quantized once per output column (symmetric), activations
//! per row as they arrive (dynamic: the row's largest magnitude maps to 127), multiplied in
//! integers and converted back to f32 with the two scales. Two instruction sequences:
//!
//! - AVX512_VNNI's `vpdpbusd`: 64 byte multiply-adds into 16 i32 sums per instruction (four
//!   times an f32 FMA's). Weights in `[-127, 127]`.
//! - AVX-512 BW without VNNI (Skylake-SP): `vpmaddubsw` (byte pairs into saturating i16 sums)
//!   then `vpmaddwd` by ones into i32 and an add: three instructions for the same 64. A pair
//!   sum must not saturate: `2 · 255 · 127` would, `2 · 255 · 63 = 32,130` does not, so the
//!   weights get one bit less, `[-63, 63]` (activations keep 8 bits).
//!
//! Opt-in (`--precision int8`), never the default: the README gives its measured effect on
//! scores and alerts next to its speed.
//!
//! Both multiply unsigned bytes by signed ones, so a row is stored offset by 128
//! (`u = round(x / s_row) + 128` in `[1, 255]`) and the offset's contribution, 128 times the
//! column's sum of quantized weights, is subtracted from each sum before scaling:
//! `out[r, j] = s_row[r] · s_col[j] · (Σ u·w − 128 Σ w)`. The sums stay far inside i32
//! (`255 · 127 · k` for any `k` this network has).
//!
//! Layout: a `[k, n]` weight matrix in 16-column panels like [`super::kernel::Packed`], each
//! lane holding four consecutive rows of its column (row `4i` in the lowest byte); each
//! activation row likewise in groups of four bytes. `k` is padded to a multiple of four with
//! zero weights.

use std::cell::RefCell;
use std::sync::OnceLock;

use super::kernel::NR;

/// Whether this CPU runs the int8 products: AVX-512 F and BW (with or without VNNI).
pub fn available() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether this CPU also has AVX512_VNNI (`vpdpbusd`, 8-bit weights); without it the products
/// use `vpmaddubsw` + `vpmaddwd` and 7-bit weights.
pub fn vnni() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            available() && std::arch::is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// What the instruction set's products allow: the largest quantized weight magnitude.
fn weight_levels(vnni: bool) -> f32 {
    if vnni { 127.0 } else { 63.0 }
}

/// The instruction set's name, for `bench` and logs.
pub fn instructions() -> &'static str {
    if vnni() { "avx512vnni" } else { "avx512bw" }
}

/// The byte offset of the unsigned activations (`u = q + 128`).
const OFFSET: i32 = 128;

/// A `[k, n]` weight matrix quantized per column and packed in groups of four rows.
#[derive(Debug, Clone)]
pub struct PackedI8 {
    data: Vec<u32>,
    /// Per column (padded to whole panels): the quantization step.
    scale: Vec<f32>,
    /// Per column (padded): 128 times the sum of its quantized weights.
    corr: Vec<i32>,
    k: usize,
    n: usize,
    /// Packed for `vpdpbusd` (8-bit weights) rather than `vpmaddubsw` (7-bit).
    vnni: bool,
}

impl PackedI8 {
    /// Quantizes and packs row-major `w [k, n]` for this CPU's products.
    pub fn new(w: &[f32], k: usize, n: usize) -> Self {
        Self::for_instructions(w, k, n, vnni())
    }

    /// As [`PackedI8::new`], for VNNI's products or (`vnni` false) the BW ones.
    fn for_instructions(w: &[f32], k: usize, n: usize, vnni: bool) -> Self {
        assert_eq!(w.len(), k * n, "packed matrix shape");
        let levels = weight_levels(vnni);
        let (kq, panels) = (k.div_ceil(4), n.div_ceil(NR));
        let cols = panels * NR;
        let mut scale = vec![1.0f32; cols];
        let mut q = vec![0i8; k * cols];
        let mut corr = vec![0i32; cols];
        for c in 0..n {
            let max = (0..k).map(|r| w[r * n + c].abs()).fold(0.0f32, f32::max);
            if max > 0.0 {
                scale[c] = max / levels;
            }
            let mut sum = 0i32;
            for r in 0..k {
                let v = (w[r * n + c] / scale[c])
                    .round_ties_even()
                    .clamp(-levels, levels) as i8;
                q[r * cols + c] = v;
                sum += i32::from(v);
            }
            corr[c] = OFFSET * sum;
        }
        let at = |r: usize, c: usize| if r < k { q[r * cols + c] as u8 } else { 0 };
        let mut data = vec![0u32; panels * kq * NR];
        for p in 0..panels {
            for i in 0..kq {
                for j in 0..NR {
                    let c = p * NR + j;
                    data[(p * kq + i) * NR + j] = u32::from_le_bytes([
                        at(4 * i, c),
                        at(4 * i + 1, c),
                        at(4 * i + 2, c),
                        at(4 * i + 3, c),
                    ]);
                }
            }
        }
        PackedI8 {
            data,
            scale,
            corr,
            k,
            n,
            vnni,
        }
    }

    fn quads(&self) -> usize {
        self.k.div_ceil(4)
    }

    /// Column `c`'s weights as the product sees them (quantized and scaled back), row by row.
    #[cfg(test)]
    fn dequantized(&self, c: usize) -> Vec<f64> {
        let (kq, p, j) = (self.quads(), c / NR, c % NR);
        (0..self.k)
            .map(|r| {
                let lane = self.data[(p * kq + r / 4) * NR + j].to_le_bytes();
                f64::from(lane[r % 4] as i8) * f64::from(self.scale[c])
            })
            .collect()
    }
}

/// `row` quantized into `dst` (`row.len()` rounded up to four bytes, offset by 128, unused
/// bytes 128): returns the step (the largest magnitude over 127; 0 for a row of zeros, whose
/// bytes are then all 128). Ties round to even, as `vcvtps2dq` does.
pub fn quantize_row(row: &[f32], dst: &mut [u32]) -> f32 {
    assert_eq!(dst.len(), row.len().div_ceil(4), "quad count");
    let max = row.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
    let byte = |i: usize| match row.get(i) {
        Some(x) => ((x * inv).round_ties_even() as i32 + OFFSET) as u8,
        None => OFFSET as u8,
    };
    for (i, d) in dst.iter_mut().enumerate() {
        *d = u32::from_le_bytes([
            byte(4 * i),
            byte(4 * i + 1),
            byte(4 * i + 2),
            byte(4 * i + 3),
        ]);
    }
    max / 127.0
}

thread_local! {
    /// The activations quantized, and their rows' steps, reused between products.
    static QUADS: RefCell<(Vec<u32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `out [m, n] += a [m, k] · w` with `a` (row stride `lda`) quantized per row and `w` per
/// column. Panics unless [`available`] (and, for a matrix packed for VNNI, [`vnni`]).
pub fn matmul_acc(a: &[f32], m: usize, lda: usize, w: &PackedI8, out: &mut [f32]) {
    product(a, m, lda, w, None, out)
}

/// `out [m, n] = bias + a [m, k] · w` (as [`matmul_acc`]; `out` is written, never read).
pub fn matmul_bias(a: &[f32], m: usize, lda: usize, w: &PackedI8, bias: &[f32], out: &mut [f32]) {
    assert_eq!(bias.len(), w.n, "bias length");
    product(a, m, lda, w, Some(bias), out)
}

fn product(a: &[f32], m: usize, lda: usize, w: &PackedI8, bias: Option<&[f32]>, out: &mut [f32]) {
    super::kernel::check_shapes(a, m, lda, w.k, w.n, out);
    assert!(available(), "AVX-512 BW is not available on this CPU");
    assert!(
        !w.vnni || vnni(),
        "packed for AVX512_VNNI, which this CPU lacks"
    );
    let kq = w.quads();
    QUADS.with(|buf| {
        let (quads, steps) = &mut *buf.borrow_mut();
        if quads.len() < m * kq {
            quads.resize(m * kq, 0);
        }
        if steps.len() < m {
            steps.resize(m, 0.0);
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512 F and BW, and VNNI where the matrix is packed for it
        // (asserted above).
        unsafe {
            for r in 0..m {
                let row = &a[r * lda..r * lda + w.k];
                steps[r] = x86::quantize_row(row, &mut quads[r * kq..(r + 1) * kq]);
            }
            let (a, steps) = (&quads[..m * kq], &steps[..m]);
            if w.vnni {
                x86::matmul_vnni(a, steps, m, kq, w, bias, out)
            } else {
                x86::matmul_bw(a, steps, m, kq, w, bias, out)
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{NR, OFFSET, PackedI8};
    use std::arch::x86_64::*;

    /// The register tile: 16 accumulators, four panel loads and four broadcasts a step (on
    /// this AMD EPYC faster than the f32 kernel's 6 x 2 of then (6 x 4 since), which kept more loads per product).
    const ROWS: usize = 4;
    const PANELS: usize = 4;

    /// [`super::quantize_row`], 16 values an instruction.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize_row(row: &[f32], dst: &mut [u32]) -> f32 {
        let (k, bytes) = (row.len(), 4 * dst.len());
        assert_eq!(dst.len(), k.div_ceil(4), "quad count");
        let mask = |have: usize| (1u32 << have.min(NR)).wrapping_sub(1) as u16;
        // SAFETY (all): every load and store is masked to the lanes inside `row` and `dst`.
        unsafe {
            let mut max = _mm512_setzero_ps();
            let mut c = 0;
            while c < k {
                let x = _mm512_maskz_loadu_ps(mask(k - c), row.as_ptr().add(c));
                max = _mm512_max_ps(max, _mm512_abs_ps(x));
                c += NR;
            }
            let max = _mm512_reduce_max_ps(max);
            let inv = _mm512_set1_ps(if max > 0.0 { 127.0 / max } else { 0.0 });
            let offset = _mm512_set1_epi32(OFFSET);
            let out = dst.as_mut_ptr().cast::<u8>();
            let mut c = 0;
            while c < bytes {
                // Lanes past the row load zero and so store the offset (a zero).
                let x =
                    _mm512_maskz_loadu_ps(mask(k.saturating_sub(c)), row.as_ptr().add(c.min(k)));
                let q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(x, inv)), offset);
                _mm512_mask_cvtepi32_storeu_epi8(out.add(c).cast(), mask(bytes - c), q);
                c += NR;
            }
            max / 127.0
        }
    }

    /// The products with `vpdpbusd`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn matmul_vnni(
        a: &[u32],
        steps: &[f32],
        m: usize,
        kq: usize,
        w: &PackedI8,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        // SAFETY: this function runs only with AVX512_VNNI (and F, BW).
        unsafe { matmul::<true>(a, steps, m, kq, w, bias, out) }
    }

    /// The products with `vpmaddubsw` + `vpmaddwd` (7-bit weights: no i16 saturation).
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn matmul_bw(
        a: &[u32],
        steps: &[f32],
        m: usize,
        kq: usize,
        w: &PackedI8,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        // SAFETY: this function runs only with AVX-512 F and BW.
        unsafe { matmul::<false>(a, steps, m, kq, w, bias, out) }
    }

    /// `acc + Σ` of four byte products in each 32-bit lane (`s` unsigned, `w` signed): one
    /// `vpdpbusd`, or `vpmaddubsw` (pair sums in i16, exact for 7-bit `w`) and `vpmaddwd`
    /// by ones.
    #[inline(always)]
    unsafe fn dot<const VNNI: bool>(acc: __m512i, s: __m512i, w: __m512i) -> __m512i {
        // SAFETY: the callers enable AVX512_VNNI when VNNI, AVX-512 BW always.
        unsafe {
            if VNNI {
                _mm512_dpbusd_epi32(acc, s, w)
            } else {
                let pairs = _mm512_maddubs_epi16(s, w);
                _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)))
            }
        }
    }

    #[inline(always)]
    unsafe fn matmul<const VNNI: bool>(
        a: &[u32],
        steps: &[f32],
        m: usize,
        kq: usize,
        w: &PackedI8,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let n = w.n;
        let panels = n.div_ceil(NR);
        let full = m - m % ROWS;
        let mut p = 0;
        while p < panels {
            let q = PANELS.min(panels - p);
            let mut r0 = 0;
            while r0 < full {
                // SAFETY (all calls): the callers enable the instructions of `dot::<VNNI>`.
                if q == PANELS {
                    unsafe { block::<VNNI, ROWS, PANELS>(a, steps, r0, kq, w, p, bias, out) };
                } else {
                    for pp in p..p + q {
                        unsafe { block::<VNNI, ROWS, 1>(a, steps, r0, kq, w, pp, bias, out) };
                    }
                }
                r0 += ROWS;
            }
            p += q;
        }
        for r in full..m {
            let mut p = 0;
            while p + 4 <= panels {
                unsafe { block::<VNNI, 1, 4>(a, steps, r, kq, w, p, bias, out) };
                p += 4;
            }
            while p < panels {
                unsafe { block::<VNNI, 1, 1>(a, steps, r, kq, w, p, bias, out) };
                p += 1;
            }
        }
    }

    /// `R` rows from `r0` times `Q` panels from `p`: i32 sums in registers, then scaled to
    /// f32 and stored over the bias or added to `out`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const VNNI: bool, const R: usize, const Q: usize>(
        a: &[u32],
        steps: &[f32],
        r0: usize,
        kq: usize,
        w: &PackedI8,
        p: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let (data, n) = (&w.data, w.n);
        assert!((r0 + R) * kq <= a.len() && r0 + R <= steps.len());
        assert!((p + Q) * kq * NR <= data.len() && (p + Q) * NR <= w.scale.len());
        for r in 0..R {
            for q in 0..Q {
                crate::model::kernel::prefetch(&out[(r0 + r) * n + (p + q) * NR..]);
            }
        }
        // SAFETY (all): the asserts above bound every unchecked read; stores are masked to
        // the columns of `out`.
        unsafe {
            let mut acc = [[_mm512_setzero_si512(); Q]; R];
            for i in 0..kq {
                let wv: [__m512i; Q] = std::array::from_fn(|q| {
                    _mm512_loadu_si512(data.as_ptr().add(((p + q) * kq + i) * NR).cast())
                });
                for (r, acc) in acc.iter_mut().enumerate() {
                    let s = _mm512_set1_epi32(*a.get_unchecked((r0 + r) * kq + i) as i32);
                    for q in 0..Q {
                        acc[q] = dot::<VNNI>(acc[q], s, wv[q]);
                    }
                }
            }
            let mask = |c0: usize| (1u32 << NR.min(n - c0)).wrapping_sub(1) as u16;
            for q in 0..Q {
                let c0 = (p + q) * NR;
                let corr = _mm512_loadu_si512(w.corr.as_ptr().add(c0).cast());
                let scale = _mm512_loadu_ps(w.scale.as_ptr().add(c0));
                let base = bias.map(|b| _mm512_maskz_loadu_ps(mask(c0), b[c0..].as_ptr()));
                for (r, acc) in acc.iter().enumerate() {
                    let o = out[(r0 + r) * n + c0..].as_mut_ptr();
                    let s = _mm512_mul_ps(scale, _mm512_set1_ps(steps[r0 + r]));
                    let x = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[q], corr));
                    let to = match base {
                        Some(b) => b,
                        None => _mm512_maskz_loadu_ps(mask(c0), o),
                    };
                    _mm512_mask_storeu_ps(o, mask(c0), _mm512_fmadd_ps(x, s, to));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The instruction sets' packings this CPU can run: BW always, VNNI where present.
    fn packings() -> Vec<bool> {
        if !available() {
            eprintln!("no AVX-512 BW on this CPU: the int8 products cannot run here");
            return Vec::new();
        }
        if vnni() {
            vec![false, true]
        } else {
            vec![false]
        }
    }

    #[test]
    fn vector_and_scalar_quantization_agree() {
        if !available() {
            eprintln!("no AVX-512 BW on this CPU: nothing to compare");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for len in [1usize, 3, 4, 15, 16, 17, 30, 64, 77, 128, 320] {
            let mut row: Vec<f32> = (0..len).map(|_| rng.random_range(-5.0..5.0)).collect();
            // A value exactly halfway between two steps: ties go to even on both paths.
            if len > 2 {
                row[0] = 127.0;
                row[1] = 2.5;
            }
            let mut want = vec![0u32; len.div_ceil(4)];
            let s_want = quantize_row(&row, &mut want);
            let mut got = vec![7u32; len.div_ceil(4)];
            // SAFETY: available() checked above.
            let s_got = unsafe { x86::quantize_row(&row, &mut got) };
            assert_eq!(got, want, "length {len}");
            assert_eq!(s_got, s_want, "length {len}");
        }
        let mut zeros = vec![0u32; 2];
        // SAFETY: as above.
        assert_eq!(unsafe { x86::quantize_row(&[0.0; 7], &mut zeros) }, 0.0);
        assert_eq!(zeros, [0x8080_8080; 2]);
    }

    /// Quantization keeps each value within half a step of the original.
    #[test]
    fn quantized_rows_and_columns_are_within_half_a_step() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let row: Vec<f32> = (0..37).map(|_| rng.random_range(-3.0..3.0)).collect();
        let mut q = vec![0u32; 10];
        let step = quantize_row(&row, &mut q);
        let bytes: Vec<u8> = q.iter().flat_map(|x| x.to_le_bytes()).collect();
        for (i, x) in row.iter().enumerate() {
            let back = (i32::from(bytes[i]) - OFFSET) as f32 * step;
            assert!(
                (back - x).abs() <= 0.5 * step * 1.0001,
                "{i}: {x} -> {back}"
            );
        }
        assert!(bytes[37..].iter().all(|&b| b == 128), "padding is a zero");
        let (k, n) = (9, 21);
        let w: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        for vnni in [false, true] {
            let packed = PackedI8::for_instructions(&w, k, n, vnni);
            for c in 0..n {
                let step = f64::from(packed.scale[c]);
                let max = (0..k).map(|r| w[r * n + c].abs()).fold(0.0f32, f32::max);
                assert_eq!(packed.scale[c], max / weight_levels(vnni));
                for (r, back) in packed.dequantized(c).iter().enumerate() {
                    let x = f64::from(w[r * n + c]);
                    assert!((back - x).abs() <= 0.5 * step * 1.0001, "[{r},{c}]");
                }
            }
        }
    }

    /// Against the same product computed in f64 from the dequantized inputs: only the f32
    /// scaling differs. Shapes with k not a multiple of four and partial panels; each
    /// instruction set this CPU has. Weights at the extremes (every column's largest magnitude
    /// at ±levels, every activation byte 1 or 255 in the last shape) show that no pair sum
    /// saturates on the BW path.
    #[test]
    fn the_int8_product_equals_the_product_of_the_quantized_inputs() {
        for vnni in packings() {
            products_equal_the_product_of_the_quantized_inputs(vnni);
        }
    }

    fn products_equal_the_product_of_the_quantized_inputs(vnni: bool) {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        for (m, k, n) in [
            (1, 128, 512),
            (7, 30, 512),
            (13, 31, 17),
            (6, 320, 256),
            (2, 1, 3),
            (12, 64, 64),
            (5, 40, 33),
        ] {
            let extremes = (m, k, n) == (5, 40, 33);
            let mut a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut w: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            if extremes {
                // Rows of ±1 quantize to bytes 1 and 255, columns of ±1 to ±levels: the largest
                // pair sums of both signs.
                a.iter_mut().for_each(|x| *x = x.signum());
                w.iter_mut().for_each(|x| *x = x.signum());
            }
            let bias: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let packed = PackedI8::for_instructions(&w, k, n, vnni);
            let mut got = vec![0.5f32; m * n];
            matmul_acc(&a, m, k, &packed, &mut got);
            let mut from_bias = vec![f32::NAN; m * n + 1];
            matmul_bias(&a, m, k, &packed, &bias, &mut from_bias);
            assert!(from_bias[m * n].is_nan(), "wrote past the output");
            let cols: Vec<Vec<f64>> = (0..n).map(|c| packed.dequantized(c)).collect();
            let mut worst = 0f64;
            for i in 0..m {
                let row = &a[i * k..(i + 1) * k];
                let mut q = vec![0u32; k.div_ceil(4)];
                let step = f64::from(quantize_row(row, &mut q));
                let bytes: Vec<u8> = q.iter().flat_map(|x| x.to_le_bytes()).collect();
                let x: Vec<f64> = (0..k)
                    .map(|kk| f64::from(i32::from(bytes[kk]) - OFFSET) * step)
                    .collect();
                for j in 0..n {
                    let want: f64 = (0..k).map(|kk| x[kk] * cols[j][kk]).sum();
                    let exact: f64 = (0..k)
                        .map(|kk| f64::from(row[kk]) * f64::from(w[kk * n + j]))
                        .sum();
                    worst = worst.max((want - exact).abs());
                    let g = got[i * n + j] as f64 - 0.5;
                    assert!(
                        (g - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "vnni {vnni}, {m}x{k}x{n} [{i},{j}]: {g} vs {want}"
                    );
                    let g = (from_bias[i * n + j] - bias[j]) as f64;
                    assert!(
                        (g - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "vnni {vnni}, {m}x{k}x{n} [{i},{j}] with bias: {g} vs {want}"
                    );
                }
            }
            // And the quantized product is near the exact one (steps of 1/127 of each row's
            // and 1/127 or 1/63 of each column's largest value).
            assert!(
                worst < 0.03 * (k as f64).sqrt(),
                "vnni {vnni}, {m}x{k}x{n}: {worst}"
            );
        }
    }
}
