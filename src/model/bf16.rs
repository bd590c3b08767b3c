//! Reduced-precision products: weights and activations rounded to bfloat16 (8 bits of
//! mantissa), multiplied pairwise with AVX512_BF16's `vdpbf16ps` into f32 accumulators: twice
//! the multiply-adds of an f32 FMA per instruction. Opt-in (`--precision bf16`), never the
//! default: the README gives its measured effect on scores and alerts next to its speed.
//!
//! Layout: a `[k, n]` weight matrix in 16-column panels like [`super::kernel::Packed`], but each
//! lane holds a pair of consecutive rows (`w[2i]` in the low half, `w[2i+1]` in the high half),
//! as `vdpbf16ps` multiplies pairs; each row of the activations is rounded to pairs once per
//! product.

use std::cell::RefCell;
use std::sync::OnceLock;

use super::kernel::NR;

/// Whether this CPU has AVX512_BF16 (with AVX-512F).
pub fn available() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `x` rounded to the nearest bfloat16 (ties to even), as its 16 bits.
pub fn round(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// A pair of values as one lane: `lo` in the low 16 bits.
fn pair(lo: f32, hi: f32) -> u32 {
    u32::from(round(lo)) | (u32::from(round(hi)) << 16)
}

/// A `[k, n]` weight matrix rounded to bf16 and packed in row pairs (see the module doc).
#[derive(Debug, Clone)]
pub struct PackedBf16 {
    data: Vec<u32>,
    k: usize,
    n: usize,
}

impl PackedBf16 {
    /// Packs row-major `w [k, n]` (an odd last row is paired with zero).
    pub fn new(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "packed matrix shape");
        let (kp, panels) = (k.div_ceil(2), n.div_ceil(NR));
        let at = |r: usize, c: usize| if r < k && c < n { w[r * n + c] } else { 0.0 };
        let mut data = vec![0u32; panels * kp * NR];
        for p in 0..panels {
            for i in 0..kp {
                for j in 0..NR {
                    let c = p * NR + j;
                    data[(p * kp + i) * NR + j] = pair(at(2 * i, c), at(2 * i + 1, c));
                }
            }
        }
        PackedBf16 { data, k, n }
    }

    fn pairs(&self) -> usize {
        self.k.div_ceil(2)
    }
}

thread_local! {
    /// The activations rounded to pairs, reused between products.
    static PAIRS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// `out [m, n] += a [m, k] · w` with `a` (row stride `lda`) and `w` rounded to bf16 and f32
/// accumulation. Panics unless [`available`].
pub fn matmul_acc(a: &[f32], m: usize, lda: usize, w: &PackedBf16, out: &mut [f32]) {
    product(a, m, lda, w, None, out)
}

/// `out [m, n] = bias + a [m, k] · w` (as [`matmul_acc`]; `out` is written, never read, as
/// [`super::kernel::matmul_bias`]).
pub fn matmul_bias(a: &[f32], m: usize, lda: usize, w: &PackedBf16, bias: &[f32], out: &mut [f32]) {
    assert_eq!(bias.len(), w.n, "bias length");
    product(a, m, lda, w, Some(bias), out)
}

fn product(a: &[f32], m: usize, lda: usize, w: &PackedBf16, bias: Option<&[f32]>, out: &mut [f32]) {
    super::kernel::check_shapes(a, m, lda, w.k, w.n, out);
    assert!(available(), "AVX512_BF16 is not available on this CPU");
    let kp = w.pairs();
    PAIRS.with(|buf| {
        let mut buf = buf.borrow_mut();
        if buf.len() < m * kp {
            buf.resize(m * kp, 0);
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX512_BF16 (asserted above).
        unsafe {
            for r in 0..m {
                let row = &a[r * lda..r * lda + w.k];
                x86::to_pairs(row, &mut buf[r * kp..(r + 1) * kp]);
            }
            x86::matmul(&buf[..m * kp], m, kp, w, bias, out)
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{NR, PackedBf16};
    use std::arch::x86_64::*;

    /// The register tile: 16 accumulators, four panel loads and four broadcasts a step (on
    /// this AMD EPYC faster than the f32 kernel's 6 x 2 of then (6 x 4 since), which kept more loads per product).
    const ROWS: usize = 4;
    const PANELS: usize = 4;

    /// `row` rounded to bf16 pairs (`dst.len()` = half its length, rounded up; ties to even,
    /// as [`super::round`]), 32 values an instruction.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn to_pairs(row: &[f32], dst: &mut [u32]) {
        assert_eq!(dst.len(), row.len().div_ceil(2), "pair count");
        let mut chunks = row.chunks_exact(32);
        let mut d = 0;
        for c in &mut chunks {
            // SAFETY: 32 floats read, 16 lanes written inside `dst` (asserted length).
            unsafe {
                let v = _mm512_cvtne2ps_pbh(
                    _mm512_loadu_ps(c.as_ptr().add(16)),
                    _mm512_loadu_ps(c.as_ptr()),
                );
                _mm512_storeu_si512(
                    dst.as_mut_ptr().add(d).cast(),
                    std::mem::transmute::<__m512bh, __m512i>(v),
                );
            }
            d += 16;
        }
        let rest = chunks.remainder();
        for (i, out) in dst[d..].iter_mut().enumerate() {
            let hi = rest.get(2 * i + 1).copied().unwrap_or(0.0);
            *out = super::pair(rest[2 * i], hi);
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn matmul(
        a: &[u32],
        m: usize,
        kp: usize,
        w: &PackedBf16,
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
                // SAFETY (all calls): this function runs only with AVX512_BF16.
                if q == PANELS {
                    unsafe { block::<ROWS, PANELS>(a, r0, kp, &w.data, p, bias, out, n) };
                } else {
                    for pp in p..p + q {
                        unsafe { block::<ROWS, 1>(a, r0, kp, &w.data, pp, bias, out, n) };
                    }
                }
                r0 += ROWS;
            }
            p += q;
        }
        for r in full..m {
            let mut p = 0;
            while p + 4 <= panels {
                unsafe { block::<1, 4>(a, r, kp, &w.data, p, bias, out, n) };
                p += 4;
            }
            while p < panels {
                unsafe { block::<1, 1>(a, r, kp, &w.data, p, bias, out, n) };
                p += 1;
            }
        }
    }

    /// `R` rows from `r0` times `Q` panels from `p`, accumulated in registers (from the bias
    /// and stored, or from zero and added).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const R: usize, const Q: usize>(
        a: &[u32],
        r0: usize,
        kp: usize,
        data: &[u32],
        p: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
        n: usize,
    ) {
        assert!((r0 + R) * kp <= a.len() && (p + Q) * kp * NR <= data.len());
        // The output lines added to at the end, asked for now (as the f32 kernel does).
        for r in 0..R {
            for q in 0..Q {
                crate::model::kernel::prefetch(&out[(r0 + r) * n + (p + q) * NR..]);
            }
        }
        unsafe {
            let mask = |c0: usize| (1u32 << NR.min(n - c0)).wrapping_sub(1) as u16;
            let init: [__m512; Q] = std::array::from_fn(|q| {
                let c0 = (p + q) * NR;
                match bias {
                    // A masked load reads only the bias's lanes.
                    Some(b) => _mm512_maskz_loadu_ps(mask(c0), b[c0..].as_ptr()),
                    None => _mm512_setzero_ps(),
                }
            });
            let mut acc = [init; R];
            for i in 0..kp {
                let wv: [__m512bh; Q] = std::array::from_fn(|q| {
                    let v = _mm512_loadu_si512(data.as_ptr().add(((p + q) * kp + i) * NR).cast());
                    std::mem::transmute::<__m512i, __m512bh>(v)
                });
                for (r, acc) in acc.iter_mut().enumerate() {
                    let s = _mm512_set1_epi32(*a.get_unchecked((r0 + r) * kp + i) as i32);
                    let s = std::mem::transmute::<__m512i, __m512bh>(s);
                    for q in 0..Q {
                        acc[q] = _mm512_dpbf16_ps(acc[q], s, wv[q]);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (q, acc) in acc.iter().enumerate() {
                    let c0 = (p + q) * NR;
                    let cols = NR.min(n - c0);
                    let o = &mut out[(r0 + r) * n + c0..(r0 + r) * n + c0 + cols];
                    // Masked loads and stores touch only the lanes inside `o`.
                    let sum = match bias {
                        Some(_) => *acc,
                        None => _mm512_add_ps(_mm512_maskz_loadu_ps(mask(c0), o.as_ptr()), *acc),
                    };
                    _mm512_mask_storeu_ps(o.as_mut_ptr(), mask(c0), sum);
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

    #[test]
    fn rounding_keeps_eight_bits_and_ties_to_even() {
        assert_eq!(round(1.0), 0x3F80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: to even (1).
        assert_eq!(round(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(round(1.0 + 3.0 / 256.0), 0x3F82);
        for x in [0.1f32, -3.7, 1e-3, 123.456] {
            let back = f32::from_bits(u32::from(round(x)) << 16);
            assert!(((back - x) / x).abs() <= 1.0 / 256.0, "{x} -> {back}");
        }
    }

    #[test]
    fn vector_and_scalar_rounding_agree() {
        if !available() {
            eprintln!("AVX512_BF16 not on this CPU: nothing to compare");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        for len in [1usize, 2, 31, 32, 33, 64, 77] {
            let row: Vec<f32> = (0..len).map(|_| rng.random_range(-50.0..50.0)).collect();
            let mut got = vec![0u32; len.div_ceil(2)];
            // SAFETY: available() checked above.
            unsafe { x86::to_pairs(&row, &mut got) };
            for (i, g) in got.iter().enumerate() {
                let want = pair(row[2 * i], row.get(2 * i + 1).copied().unwrap_or(0.0));
                assert_eq!(*g, want, "length {len} pair {i}");
            }
        }
    }

    /// Against the same product computed in f64 from the bf16-rounded inputs: only the f32
    /// accumulation differs. Shapes with odd k and partial panels.
    #[test]
    fn the_bf16_product_equals_the_product_of_the_rounded_inputs() {
        if !available() {
            eprintln!("AVX512_BF16 not on this CPU: nothing to compare");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let r = |x: f32| f32::from_bits(u32::from(round(x)) << 16) as f64;
        for (m, k, n) in [
            (1, 128, 512),
            (7, 30, 512),
            (13, 31, 17),
            (6, 320, 256),
            (2, 1, 3),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let w: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let bias: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let packed = PackedBf16::new(&w, k, n);
            let mut got = vec![0.5f32; m * n];
            matmul_acc(&a, m, k, &packed, &mut got);
            // From the bias, over whatever `out` held (never read), nothing past the m rows.
            let mut from_bias = vec![f32::NAN; m * n + 1];
            matmul_bias(&a, m, k, &packed, &bias, &mut from_bias);
            assert!(from_bias[m * n].is_nan(), "wrote past the output");
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|kk| r(a[i * k + kk]) * r(w[kk * n + j])).sum();
                    let g = got[i * n + j] as f64 - 0.5;
                    assert!(
                        (g - want).abs() < 1e-4,
                        "{m}x{k}x{n} [{i},{j}]: {g} vs {want}"
                    );
                    let g = (from_bias[i * n + j] - bias[j]) as f64;
                    assert!(
                        (g - want).abs() < 1e-4,
                        "{m}x{k}x{n} [{i},{j}] with bias: {g} vs {want}"
                    );
                }
            }
        }
    }
}
