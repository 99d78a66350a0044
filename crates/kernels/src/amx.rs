//! Intel AMX tiles (AMX-TILE + AMX-INT8): detection, the Linux permission request, the tile
//! configuration and one thin wrapper per tile instruction.
//!
//! A tile is a 2-D register of up to 16 rows × 64 bytes; `TDPBSUD` multiplies a tile of signed
//! bytes (M × K) by a tile of unsigned bytes laid out as K/4 rows of N × 4 bytes (the same
//! "four consecutive elements of one row together" order as `vpdpbusd`) and adds the exact
//! int32 products to an M × N tile: 16 × 16 × 64 multiply-adds in one instruction, against 64
//! for one 512-bit `vpdpbusd`. The packed kernels ([`crate::packed`]) use it when a batch has
//! several tokens; results are exact integers either way, so batch invariance is kept.
//!
//! Linux keeps the 8 KiB tile state off by default: a process must ask once with
//! `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)` before any thread touches a tile
//! (the grant covers every thread, also those started earlier). [`available`] does that.
//!
//! The instruction wrappers name their tile registers as const generics (`tmm0`–`tmm7` are not
//! registers the compiler allocates), so a kernel decides which tile holds what.

use std::sync::OnceLock;

/// Whether the CPU has AMX-TILE and AMX-INT8 and the OS granted this process the tile state;
/// asked once per process.
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // CPUID.(EAX=7,ECX=0):EDX bit 24 = AMX-TILE, bit 25 = AMX-INT8.
    let leaf7 = __cpuid_count(7, 0);
    let cpu = leaf7.edx & (1 << 24) != 0 && leaf7.edx & (1 << 25) != 0;
    if !cpu {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes which extended states the kernel
    // lets this process use; it reads and writes no memory of ours.
    let status = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    status == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// A tile configuration (`ldtilecfg`'s 64-byte operand, palette 1): rows and bytes per row of
/// each of the eight tiles; unused tiles stay 0 × 0.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct TileConfig([u8; 64]);

impl Default for TileConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl TileConfig {
    /// Palette 1 with every tile unused.
    pub const fn new() -> TileConfig {
        let mut b = [0u8; 64];
        b[0] = 1;
        TileConfig(b)
    }

    /// Sets tile `tile` (0..8) to `rows` (1..=16) rows of `bytes` (4..=64, a multiple of 4)
    /// bytes.
    ///
    /// # Panics
    /// On a shape the hardware does not have.
    pub fn set(&mut self, tile: usize, rows: usize, bytes: usize) -> &mut TileConfig {
        assert!(
            tile < 8 && (1..=16).contains(&rows) && (4..=64).contains(&bytes) && bytes % 4 == 0,
            "no AMX tile {tile} of {rows} × {bytes} bytes"
        );
        self.0[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&(bytes as u16).to_le_bytes());
        self.0[48 + tile] = rows as u8;
        self
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::*;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::TileConfig;
    use std::arch::asm;

    /// Loads `cfg` into this thread's tile configuration (zeroing every tile).
    ///
    /// # Safety
    /// [`super::available`] returned true.
    #[inline]
    pub(crate) unsafe fn configure(cfg: &TileConfig) {
        // SAFETY: the operand is a valid 64-byte palette-1 configuration ([`TileConfig::set`]
        // checks every shape); the caller guarantees the tile state is enabled.
        unsafe {
            asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly, preserves_flags))
        };
    }

    /// Returns the tiles to their initial state, so the OS need not save them on a switch.
    ///
    /// # Safety
    /// [`super::available`] returned true.
    #[inline]
    pub(crate) unsafe fn release() {
        // SAFETY: no operands; the caller guarantees the tile state is enabled.
        unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
    }

    /// Loads tile `T` from `p`, one configured row every `stride` bytes.
    ///
    /// # Safety
    /// Tiles are configured and `rows(T) - 1` strides plus `bytes(T)` from `p` are readable.
    #[inline]
    pub(crate) unsafe fn load<const T: u8>(p: *const u8, stride: usize) {
        // SAFETY: the caller guarantees the configured rows are readable memory.
        unsafe {
            asm!("tileloadd tmm{t}, [{p} + {s}*1]", t = const T, p = in(reg) p, s = in(reg) stride,
                 options(nostack, readonly, preserves_flags))
        };
    }

    /// Stores tile `T` to `p`, one row every `stride` bytes.
    ///
    /// # Safety
    /// Tiles are configured and the configured rows from `p` are writable and ours.
    #[inline]
    pub(crate) unsafe fn store<const T: u8>(p: *mut u8, stride: usize) {
        // SAFETY: the caller guarantees the configured rows are writable memory it owns.
        unsafe {
            asm!("tilestored [{p} + {s}*1], tmm{t}", t = const T, p = in(reg) p, s = in(reg) stride,
                 options(nostack, preserves_flags))
        };
    }

    /// Zeroes tile `T`.
    ///
    /// # Safety
    /// Tiles are configured.
    #[inline]
    pub(crate) unsafe fn zero<const T: u8>() {
        // SAFETY: register-only; the caller guarantees the configuration.
        unsafe { asm!("tilezero tmm{t}", t = const T, options(nostack, nomem, preserves_flags)) };
    }

    /// `C += A · B` over bytes: tile `A` signed (M × K), tile `B` unsigned (K/4 × 4N), tile `C`
    /// int32 (M × N).
    ///
    /// # Safety
    /// Tiles are configured with matching shapes.
    #[inline]
    pub(crate) unsafe fn dp_signed_unsigned<const C: u8, const A: u8, const B: u8>() {
        // SAFETY: register-only; the caller guarantees the shapes match.
        unsafe {
            asm!("tdpbsud tmm{c}, tmm{a}, tmm{b}", c = const C, a = const A, b = const B,
                 options(nostack, nomem, preserves_flags))
        };
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// One tile product against the integer definition, with extreme signed and unsigned bytes
    /// and fewer rows than the tile holds.
    #[test]
    fn tile_product_matches_integer_dot() {
        if !available() {
            eprintln!("no AMX on this machine");
            return;
        }
        let (m, k, n) = (13usize, 32usize, 16usize);
        let a: Vec<i8> = (0..m * k)
            .map(|i| match i % 7 {
                0 => -128,
                1 => 127,
                _ => ((i * 37 % 255) as i32 - 127) as i8,
            })
            .collect();
        let b: Vec<u8> = (0..k * n)
            .map(|i| {
                if i % 5 == 0 {
                    255
                } else {
                    (i * 13 % 251) as u8
                }
            })
            .collect();
        let mut c = vec![7i32; m * n];
        let mut cfg = TileConfig::new();
        cfg.set(0, m, 4 * n).set(1, m, k).set(2, k / 4, 4 * n);
        // SAFETY: AMX is available; a is m × k, b is k/4 × 4n, c is m × n: the configured
        // shapes.
        unsafe {
            configure(&cfg);
            zero::<0>();
            load::<1>(a.as_ptr() as *const u8, k);
            load::<2>(b.as_ptr(), 4 * n);
            dp_signed_unsigned::<0, 1, 2>();
            store::<0>(c.as_mut_ptr() as *mut u8, 4 * n);
            release();
        }
        for i in 0..m {
            for j in 0..n {
                let want: i32 = (0..k)
                    .map(|e| a[i * k + e] as i32 * b[(e / 4) * 4 * n + 4 * j + e % 4] as i32)
                    .sum();
                assert_eq!(c[i * n + j], want, "({i}, {j})");
            }
        }
    }

    #[test]
    #[should_panic(expected = "no AMX tile")]
    fn impossible_tile_shapes_are_refused() {
        TileConfig::new().set(0, 17, 64);
    }
}
