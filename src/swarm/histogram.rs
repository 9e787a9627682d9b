//! A fixed-size log-bucket histogram (HDR-like) for latencies in µs.
//!
//! Values below 2^SUB_BITS are exact; above, each power of two is split into 2^SUB_BITS
//! buckets, so a reported percentile is within 1/2^SUB_BITS (≈3%) of the true value. Recording
//! is a couple of shifts and an increment — no allocation — and histograms from several
//! processes merge by adding counts.

use serde::{Deserialize, Serialize};

/// Sub-buckets per power of two = 2^SUB_BITS: 32 gives ≤ 3.1% relative error.
const SUB_BITS: u32 = 5;

/// Buckets per octave.
const SUB: u64 = 1 << SUB_BITS;

/// Enough buckets for any u64.
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

/// Latency histogram.
#[derive(Debug, Clone)]
pub struct Histogram {
    /// Counts per bucket.
    counts: Vec<u64>,
    /// Number of recorded values.
    total: u64,
    /// Exact maximum recorded.
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

/// Bucket index of `v`.
fn index(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // ≥ SUB_BITS
    let sub = (v >> (exp - SUB_BITS)) & (SUB - 1);
    ((exp - SUB_BITS + 1) as u64 * SUB + sub) as usize
}

/// Largest value that falls in bucket `i`.
fn upper(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let exp = (i / SUB) as u32 + SUB_BITS - 1;
    let sub = i % SUB;
    let low = (1u64 << exp) | (sub << (exp - SUB_BITS));
    low.saturating_add((1u64 << (exp - SUB_BITS)) - 1)
}

/// The compact, mergeable form of a histogram (non-empty buckets only).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SparseHistogram {
    /// `(bucket index, count)` for non-empty buckets.
    pub buckets: Vec<(u32, u64)>,
    /// Exact maximum.
    pub max: u64,
}

impl Histogram {
    /// Records one value.
    #[inline]
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.total += 1;
        self.max = self.max.max(v);
    }

    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Exact maximum (0 when empty).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `q` (0..=1), as the upper bound of its bucket capped by the exact
    /// maximum; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return upper(i).min(self.max);
            }
        }
        self.max
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, other: &SparseHistogram) {
        for &(i, c) in &other.buckets {
            if let Some(slot) = self.counts.get_mut(i as usize) {
                *slot += c;
                self.total += c;
            }
        }
        self.max = self.max.max(other.max);
    }

    /// The compact form.
    pub fn to_sparse(&self) -> SparseHistogram {
        SparseHistogram {
            buckets: self
                .counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, &c)| (i as u32, c))
                .collect(),
            max: self.max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_bounded() {
        let mut prev = 0;
        for v in (0..100_000u64).chain([u64::MAX / 3, u64::MAX]) {
            let i = index(v);
            assert!(i < BUCKETS);
            assert!(i >= prev || v > 100_000);
            prev = i;
            assert!(upper(i) >= v, "v {v} bucket {i} upper {}", upper(i));
            // Relative error bound.
            assert!(
                (upper(i) - v) as f64 <= v as f64 / SUB as f64 + 1.0,
                "v {v}"
            );
        }
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), 0);
        for v in 1..=1000u64 {
            h.record(v);
        }
        let p50 = h.quantile(0.5);
        let p99 = h.quantile(0.99);
        assert!((500..=516).contains(&p50), "{p50}");
        assert!((990..=1000).contains(&p99), "{p99}");
        assert_eq!(h.quantile(1.0), 1000);
        assert_eq!(h.max(), 1000);
        let mut m = Histogram::default();
        m.merge(&h.to_sparse());
        m.merge(&h.to_sparse());
        assert_eq!(m.count(), 2000);
        assert_eq!(m.quantile(0.5), p50);
    }
}
