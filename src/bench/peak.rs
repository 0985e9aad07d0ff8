//! The core's own arithmetic ceiling: how many f32 FMA (and bf16 dot-product) flops per second this
//! CPU retires when nothing but independent register-to-register multiply-adds run. No kernel of a
//! product can beat it, so `scripts/bench-vs-torch.sh` sets every ms/token target against it: a
//! target that needs the step's products at or above this rate cannot be met on the machine.

use std::time::Instant;

use serde::Serialize;

/// One measured ceiling.
#[derive(Debug, Serialize)]
pub struct CorePeak {
    /// The instruction timed: `vfmadd231ps zmm` (f32) or `vdpbf16ps zmm` (bf16 pairs, f32 sums).
    pub instruction: &'static str,
    pub dtype: &'static str,
    pub threads: usize,
    /// Flops per second over all threads (an FMA lane is 2 flops; a bf16 pair's product and sum, 2).
    pub gflops: f64,
}

/// A loop of `ROUNDS` rounds of one instruction on every chain, unsafe for its target features.
#[cfg(target_arch = "x86_64")]
type TimedLoop = unsafe fn(usize) -> f32;

/// Independent accumulator chains per thread: enough to cover the FMA latency on both pipes.
const CHAINS: usize = 12;
/// Loop rounds per timing: 1.2G instructions, about 0.2 s at two per cycle and 3 GHz.
const ROUNDS: usize = 100_000_000;
/// Timings per ceiling; the fastest counts (noise only ever adds time).
const TRIES: usize = 5;

/// The f32 FMA ceiling and, where the CPU has AVX-512 BF16, the bf16 one, on `threads` threads at
/// once (each its own chains); empty where the CPU lacks AVX-512.
pub fn core_peaks(threads: usize) -> Vec<CorePeak> {
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        let threads = threads.max(1);
        let bf16 = is_x86_feature_detected!("avx512bf16");
        // (instruction, dtype, flops per instruction, whether the CPU has it, the timed loop)
        let kinds: [(&'static str, &'static str, usize, bool, TimedLoop); 2] = [
            ("vfmadd231ps zmm", "f32", 16 * 2, true, x86::fma_f32),
            ("vdpbf16ps zmm", "bf16", 32 * 2, bf16, x86::dot_bf16),
        ];
        if is_x86_feature_detected!("avx512f") {
            for (instruction, dtype, per_instruction, _, run) in kinds.into_iter().filter(|k| k.3) {
                // SAFETY: the CPU has AVX-512 F and, for the bf16 loop, AVX-512 BF16 (checked above).
                let seconds = fastest(threads, || unsafe { run(ROUNDS) });
                out.push(CorePeak { instruction, dtype, threads, gflops: flops(threads, per_instruction, seconds) });
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = threads;
    out
}

/// GFLOP/s of `threads` threads each retiring `ROUNDS * CHAINS` instructions of `per_instruction`
/// flops in `seconds`.
fn flops(threads: usize, per_instruction: usize, seconds: f64) -> f64 {
    (threads * ROUNDS * CHAINS * per_instruction) as f64 / seconds / 1e9
}

/// Wall seconds of the fastest of `TRIES` runs of `work` on `threads` threads started together.
fn fastest(threads: usize, work: impl Fn() -> f32 + Sync) -> f64 {
    (0..TRIES)
        .map(|_| {
            let t0 = Instant::now();
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads).map(|_| s.spawn(&work)).collect();
                // The sums keep the loops from being optimised away.
                std::hint::black_box(handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum::<f32>());
            });
            t0.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `rounds` x `CHAINS` dependent-per-chain FMAs on 16 lanes; returns a sum of the results.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_f32(rounds: usize) -> f32 {
        let mut acc = [_mm512_set1_ps(1.0); super::CHAINS];
        let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        for _ in 0..rounds {
            for c in acc.iter_mut() {
                *c = _mm512_fmadd_ps(*c, a, b);
            }
        }
        acc.iter().map(|&c| _mm512_reduce_add_ps(c)).sum()
    }

    /// `rounds` x `CHAINS` dependent-per-chain `vdpbf16ps` (32 bf16 pairs into 16 f32 lanes).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dot_bf16(rounds: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); super::CHAINS];
        // bf16 1.0 (0x3F80) and 1e-3 (0x3A83) in every pair.
        let (a, b) = (_mm512_set1_epi16(0x3F80u16 as i16), _mm512_set1_epi16(0x3A83u16 as i16));
        let (a, b) = (std::mem::transmute::<__m512i, __m512bh>(a), std::mem::transmute::<__m512i, __m512bh>(b));
        for _ in 0..rounds {
            for c in acc.iter_mut() {
                *c = _mm512_dpbf16_ps(*c, a, b);
            }
        }
        acc.iter().map(|&c| _mm512_reduce_add_ps(c)).sum()
    }
}
