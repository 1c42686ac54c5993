//! Order statistics of measured samples: percentiles by linear interpolation between ranks.

use serde::{Deserialize, Serialize};

/// A summary of samples, all in one unit (the caller's: µs, ms or ns).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct Summary {
    /// How many samples.
    pub(crate) count: usize,
    pub(crate) min: f64,
    pub(crate) median: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    pub(crate) mean: f64,
}

impl Summary {
    /// Summarises `samples` (sorted in place); `None` when there are none.
    pub(crate) fn of(samples: &mut [f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(f64::total_cmp);
        Some(Self {
            count: samples.len(),
            min: samples[0],
            median: percentile(samples, 50.0),
            p99: percentile(samples, 99.0),
            max: samples[samples.len() - 1],
            mean: samples.iter().sum::<f64>() / samples.len() as f64,
        })
    }
}

/// The `p`th percentile (0–100) of `sorted` (ascending, non-empty), interpolating linearly
/// between the two nearest ranks, as numpy's default does: the median of `[1, 2, 3, 4]` is 2.5.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty(), "percentile of no samples");
    let rank = (p.clamp(0.0, 100.0) / 100.0) * (sorted.len() - 1) as f64;
    let below = rank.floor() as usize;
    let above = rank.ceil() as usize;
    let weight = rank - below as f64;
    sorted[below] + (sorted[above] - sorted[below]) * weight
}

/// The median of `values` in any order; `None` when there are none.
pub(crate) fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    Summary::of(&mut sorted).map(|s| s.median)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let one_to_hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&one_to_hundred, 0.0), 1.0);
        assert_eq!(percentile(&one_to_hundred, 50.0), 50.5);
        assert!((percentile(&one_to_hundred, 99.0) - 99.01).abs() < 1e-9);
        assert_eq!(percentile(&one_to_hundred, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), 2.5);
    }

    #[test]
    fn summaries_sort_their_samples() {
        let mut samples = vec![5.0, 1.0, 4.0, 2.0, 3.0];
        let summary = Summary::of(&mut samples).unwrap();
        assert_eq!(samples, [1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(summary.count, 5);
        assert_eq!((summary.min, summary.median, summary.max), (1.0, 3.0, 5.0));
        assert_eq!(summary.mean, 3.0);
        assert!((summary.p99 - 4.96).abs() < 1e-9);
        assert_eq!(Summary::of(&mut []), None);
        assert_eq!(median(&[3.0, 1.0]), Some(2.0));
        assert_eq!(median(&[]), None);
    }
}
