//! The frozen-weight products on AMX tiles (Intel Xeon from Sapphire Rapids on), for `matmul`.
//!
//! One `tdpbf16ps` multiplies a 16 x 32 bf16 tile of activations by a 32 x 16 bf16 tile of the
//! weight into 16 x 16 f32 sums: sixteen times the work of one `vdpbf16ps`. It reads the operands
//! the AVX-512 kernel reads: the weight's panels (a panel's 32 columns are two B tiles, read with
//! the panel's 128-byte row stride) and the activations as rows of bf16 pairs. Products and sums
//! are f32 as there, but the tile unit adds each pair's two products in an order of its own, so a
//! sum may differ from the AVX-512 kernel's in its last bits; each output row still depends on its
//! input row alone (tested), so results do not depend on the batch around a row. The attention's
//! products of rows of pairs (scores, dP, and probabilities times values) run here too (`product`).

use std::arch::asm;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

use super::super::shared::SharedOut;
use super::{pairs_into, Panels, NR, TILE_PAIRS};

/// Rows of an A or C tile.
const TILE_ROWS: usize = 16;
/// Rows per kernel call: two A tiles against a panel's two B tiles, four C tiles of sums.
const BLOCK: usize = 2 * TILE_ROWS;
/// Fewer rows than this go to the AVX-512 kernel: a block's rows past the matrix are zeros that
/// the tiles multiply all the same.
pub(super) const MIN_ROWS: usize = BLOCK;

/// Whether the CPU has AMX-TILE and AMX-BF16 and the kernel lets this process use the tiles.
pub(super) fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| cpu_has_amx_bf16() && request_tile_state())
}

/// CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
fn cpu_has_amx_bf16() -> bool {
    #[allow(unused_unsafe)] // `__cpuid_count` is safe from Rust 1.87 on
    // SAFETY: CPUID exists on every x86-64 CPU.
    let edx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx;
    edx & (1 << 22) != 0 && edx & (1 << 24) != 0
}

/// Linux gives the tiles' 8 KiB of register state only to a process that asks for it
/// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); it refuses where the kernel or the
/// hypervisor does not support it, and the AVX-512 kernel is used then.
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a system call with integer arguments only.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

/// The tile configuration `ldtilecfg` reads (palette 1): tmm0-3 the 16 x 16 f32 sums, tmm4-5 two
/// A tiles of 16 rows x 16 pairs, tmm6-7 two B tiles of 16 pairs x 16 columns; 64 bytes a row each.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = {
    let mut bytes_per_row = [0u16; 16];
    let mut rows = [0u8; 16];
    let mut t = 0;
    while t < 8 {
        bytes_per_row[t] = 64;
        rows[t] = TILE_ROWS as u8;
        t += 1;
    }
    TileConfig { palette: 1, start_row: 0, reserved: [0; 14], bytes_per_row, rows }
};

/// `x [m, b.k] · B -> [m, b.n]`; `threads` panels run at once. The CPU must have AMX (`available`).
pub(super) fn matmul(x: &[f32], m: usize, b: &Panels, threads: usize) -> Vec<f32> {
    assert!(available(), "AMX products on a CPU without AMX");
    let (k2, depth, n) = (b.k.div_ceil(2), b.stride, b.n);
    let blocks = m.div_ceil(BLOCK);
    // A: every row as `depth` pairs (zeros past k2), and zero rows up to whole blocks, written once
    // each on the pool.
    let mut a: Vec<u32> = Vec::with_capacity(blocks * BLOCK * depth);
    let pack = |(row, words): (usize, &mut [MaybeUninit<u32>])| {
        for w in words.iter_mut() {
            w.write(0);
        }
        // SAFETY: every word was just written.
        let words = unsafe { &mut *(words as *mut [MaybeUninit<u32>] as *mut [u32]) };
        if row < m {
            pairs_into(&x[row * b.k..(row + 1) * b.k], &mut words[..k2]);
        }
    };
    let spare = &mut a.spare_capacity_mut()[..blocks * BLOCK * depth];
    if threads > 1 && m > BLOCK {
        use rayon::prelude::*;
        spare.par_chunks_mut(depth).enumerate().for_each(pack);
    } else {
        spare.chunks_mut(depth).enumerate().for_each(pack);
    }
    // SAFETY: `pack` wrote every row of every block.
    unsafe { a.set_len(blocks * BLOCK * depth) };

    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    let out_ptr = SharedOut::new(out.spare_capacity_mut());
    let run = |p: usize| {
        let cols = NR.min(n - p * NR);
        // SAFETY: `a` holds whole blocks of `depth` pairs for m rows, panel p `depth` pairs of NR
        // columns; out's rows x cols values from column p * NR (row stride n) are this panel's alone.
        unsafe {
            with_tiles(|| {
                let dst = out_ptr.at(p * NR).cast::<f32>();
                times_panel(&a, depth, m, b.data[p * depth * NR * 2..].as_ptr(), cols, dst, n)
            })
        };
    };
    if threads > 1 && panels_of(n) > 1 {
        use rayon::prelude::*;
        (0..panels_of(n)).into_par_iter().for_each(run);
    } else {
        (0..panels_of(n)).for_each(run);
    }
    // SAFETY: the panels wrote all m x n values (each block's rows, each panel's columns).
    unsafe { out.set_len(m * n) };
    out
}

/// `dst [m, n] = A · B` for the attention (`super::product` without `keep`): A's m rows of k2 pairs
/// (row stride `a.1` words, pair stride 1), B from column `col0` and pair `pair0` of `b`, `dst` with
/// row stride `ldc`. A is copied into whole blocks and tiles, zero-padded, so B's pairs past k2 (up
/// to `k2` rounded up to whole tiles, within `b.stride`) are read but multiply zeros: for the
/// causal products they are later tokens' rows, which reach an earlier row only if they are not
/// finite (0 x inf), when the step's loss is not finite either.
///
/// # Safety
/// As for `super::product`; the CPU must have AMX (`available`) and
/// `pair0 + k2.next_multiple_of(TILE_PAIRS) <= b.stride`.
pub(super) unsafe fn product(
    (m, n, k2): (usize, usize, usize),
    (a, a_rows): (*const u32, usize),
    b: &Panels,
    (col0, pair0): (usize, usize),
    dst: *mut f32,
    ldc: usize,
) {
    let depth = k2.next_multiple_of(TILE_PAIRS);
    debug_assert!(available() && pair0 + depth <= b.stride && col0 % NR == 0);
    let mut rows = vec![0u32; m.next_multiple_of(BLOCK) * depth];
    for (i, row) in rows.chunks_exact_mut(depth).take(m).enumerate() {
        row[..k2].copy_from_slice(std::slice::from_raw_parts(a.add(i * a_rows), k2));
    }
    with_tiles(|| {
        for p in 0..panels_of(n) {
            let panel = b.data.as_ptr().add(((col0 / NR + p) * b.stride + pair0) * NR * 2);
            times_panel(&rows, depth, m, panel, NR.min(n - p * NR), dst.add(p * NR), ldc);
        }
    });
}

fn panels_of(n: usize) -> usize {
    n.div_ceil(NR)
}

/// Runs `f` with the tiles configured by `CONFIG` on this thread, and releases them after.
///
/// # Safety
/// The CPU must have AMX and the process the tile state (`available`).
unsafe fn with_tiles<T>(f: impl FnOnce() -> T) -> T {
    asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
    let out = f();
    // Returns the tile state to its initial one (cheaper to save on a context switch).
    asm!("tilerelease", options(nostack, nomem));
    out
}

/// `dst [m, cols] = A · panel`: A whole blocks of rows of `depth` pairs (zero past m and past the
/// matrix's pairs), the panel `depth` pairs of NR columns, `dst` with row stride `ldc`.
///
/// # Safety
/// Inside `with_tiles`; the pointers must hold what is said above.
unsafe fn times_panel(a: &[u32], depth: usize, m: usize, panel: *const u16, cols: usize, dst: *mut f32, ldc: usize) {
    let mut sums = [0f32; BLOCK * NR];
    for blk in 0..m.div_ceil(BLOCK) {
        block(depth, a[blk * BLOCK * depth..][..BLOCK * depth].as_ptr(), panel, &mut sums);
        for (i, sum_row) in sums.chunks_exact(NR).take(BLOCK.min(m - blk * BLOCK)).enumerate() {
            std::ptr::copy_nonoverlapping(sum_row.as_ptr(), dst.add((blk * BLOCK + i) * ldc), cols);
        }
    }
}

/// `sums [BLOCK, NR] = A · panel` over `depth` pairs (a positive multiple of TILE_PAIRS): A is BLOCK
/// rows of `depth` pairs, the panel `depth` rows of NR column pairs (128 bytes each). One `asm!`
/// block from the zeroed sums to their stores, so no tile holds data between blocks the compiler
/// knows nothing of; only the configuration (`with_tiles`) lives across them.
///
/// # Safety
/// Inside `with_tiles`; `a` and `panel` must hold what is said above.
unsafe fn block(depth: usize, a: *const u32, panel: *const u16, sums: &mut [f32; BLOCK * NR]) {
    debug_assert!(depth > 0 && depth.is_multiple_of(TILE_PAIRS));
    let c = sums.as_mut_ptr();
    // Per step of 16 pairs: A tiles of rows 0-15 and 16-31 (64 bytes of each row, row stride
    // depth x 4 bytes), B tiles of the panel's columns 0-15 and 16-31 (the two 64-byte halves of
    // its 128-byte rows); the four C tiles are the sums' quarters (row stride NR x 4 = 128 bytes).
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "2:",
        "tileloadd tmm4, [{a0} + {sa}*1]",
        "tileloadd tmm5, [{a1} + {sa}*1]",
        "tileloadd tmm6, [{b} + {s128}*1]",
        "tileloadd tmm7, [{b} + {s128}*1 + 64]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {a0}, 64",
        "add {a1}, 64",
        "add {b}, 2048",
        "dec {steps}",
        "jnz 2b",
        "tilestored [{c0} + {s128}*1], tmm0",
        "tilestored [{c0} + {s128}*1 + 64], tmm1",
        "tilestored [{c1} + {s128}*1], tmm2",
        "tilestored [{c1} + {s128}*1 + 64], tmm3",
        a0 = inout(reg) a => _,
        a1 = inout(reg) a.add(TILE_ROWS * depth) => _,
        b = inout(reg) panel => _,
        steps = inout(reg) depth / TILE_PAIRS => _,
        sa = in(reg) depth * 4,
        s128 = in(reg) NR * 4,
        c0 = in(reg) c,
        c1 = in(reg) c.add(TILE_ROWS * NR),
        out("tmm0") _,
        out("tmm1") _,
        out("tmm2") _,
        out("tmm3") _,
        out("tmm4") _,
        out("tmm5") _,
        out("tmm6") _,
        out("tmm7") _,
        options(nostack),
    );
}
