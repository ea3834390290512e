//! A tiny seeded generator and hashing helpers.
//!
//! SplitMix64 is written out here rather than taken from `rand` so answers stay
//! byte-identical across dependency upgrades: tests pin them.

use sha2::{Digest, Sha256};

/// SplitMix64: small, fast, good enough for synthetic data and fault draws.
#[derive(Debug, Clone)]
pub struct Prng(u64);

impl Prng {
    #[cfg(test)]
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator seeded from the SHA-256 of `parts` (length-prefixed, so
    /// `["ab","c"]` and `["a","bc"]` differ).
    pub fn from_parts(parts: &[&[u8]]) -> Self {
        Self(hash_parts(parts))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        // 53 high bits give every representable step of an f64 in [0,1).
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `lo..=hi` (returns `lo` when `hi < lo`).
    pub fn range_i64(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            return lo;
        }
        let span = hi.abs_diff(lo).saturating_add(1);
        if span == 0 {
            // The whole i64 range.
            return self.next_u64() as i64;
        }
        lo.wrapping_add((self.next_u64() % span) as i64)
    }

    /// Uniform index in `0..len` (`len` must be > 0).
    pub fn index(&mut self, len: usize) -> usize {
        (self.next_u64() % len.max(1) as u64) as usize
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.index(i + 1);
            items.swap(i, j);
        }
    }

    /// `len` characters from `[a-z0-9]`.
    pub fn alnum(&mut self, len: usize) -> String {
        const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        (0..len)
            .map(|_| CHARS[self.index(CHARS.len())] as char)
            .collect()
    }

    /// `len` lowercase hex digits.
    pub fn hex(&mut self, len: usize) -> String {
        const CHARS: &[u8] = b"0123456789abcdef";
        (0..len)
            .map(|_| CHARS[self.index(CHARS.len())] as char)
            .collect()
    }

    /// A version-4-shaped UUID string.
    pub fn uuid(&mut self) -> String {
        format!(
            "{}-{}-4{}-8{}-{}",
            self.hex(8),
            self.hex(4),
            self.hex(3),
            self.hex(3),
            self.hex(12)
        )
    }
}

/// First 8 bytes of SHA-256 over length-prefixed parts.
pub fn hash_parts(parts: &[&[u8]]) -> u64 {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// A reproducible draw in `[0, 1)` for one named decision.
pub fn draw(parts: &[&[u8]]) -> f64 {
    Prng::from_parts(parts).unit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_stays_in_range_and_is_reproducible() {
        let mut a = Prng::new(7);
        let mut b = Prng::new(7);
        for _ in 0..1000 {
            let x = a.unit();
            assert!((0.0..1.0).contains(&x));
            assert_eq!(x.to_bits(), b.unit().to_bits());
        }
    }

    #[test]
    fn range_is_inclusive() {
        let mut p = Prng::new(1);
        let mut seen = [false; 5];
        for _ in 0..500 {
            let v = p.range_i64(1, 5);
            assert!((1..=5).contains(&v));
            seen[(v - 1) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
        assert_eq!(p.range_i64(3, 3), 3);
    }

    #[test]
    fn hash_parts_is_length_prefixed() {
        assert_ne!(hash_parts(&[b"ab", b"c"]), hash_parts(&[b"a", b"bc"]));
    }
}
