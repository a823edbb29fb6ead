//! The checksum devmem records for read-only and durable backups, on the host.
//!
//! The device computes the same value with the PTX kernel in `backend/kernels/checksum.cu`
//! (the emulator includes this file to model it): the sum, modulo 2^64, over the bytes' 8-byte
//! little-endian words `w[i]` of SplitMix64's finaliser applied to `w[i] + i * GOLDEN`. A sum of
//! per-word terms is what a GPU computes fastest (any order, one partial per block); the
//! position term makes moved or swapped words count.

/// The odd constant that spreads word positions.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finaliser.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The checksum of `bytes` (whose length is a multiple of 8; a shorter tail is ignored, as on
/// the device, which is only ever given whole allocations).
pub fn of(bytes: &[u8]) -> u64 {
    bytes
        .chunks_exact(8)
        .enumerate()
        .fold(0u64, |sum, (i, word)| {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            let term = u64::from_le_bytes(w).wrapping_add((i as u64).wrapping_mul(GOLDEN));
            sum.wrapping_add(mix(term))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_an_independent_implementation() {
        // Words 0..1024, computed by the NumPy version in bench/ptx_probe.py, which agreed
        // with the PTX kernel on 1 GiB of random words on an H200.
        let bytes: Vec<u8> = (0u64..1024).flat_map(u64::to_le_bytes).collect();
        assert_eq!(of(&bytes), 0x74f9_8f3f_1701_b103);
    }

    #[test]
    fn order_and_content_both_count() {
        let a: Vec<u8> = [1u64, 2].iter().flat_map(|w| w.to_le_bytes()).collect();
        let b: Vec<u8> = [2u64, 1].iter().flat_map(|w| w.to_le_bytes()).collect();
        let c: Vec<u8> = [1u64, 3].iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_ne!(of(&a), of(&b));
        assert_ne!(of(&a), of(&c));
        assert_eq!(of(&[]), 0);
    }
}
