//! The ring: the sequence of backends a VIP's new flows walk through, one slot per new flow.
//!
//! Equal weights give each backend once, in order (plain round robin). Unequal weights give
//! nginx's smooth weighted round robin: weights 5:1:1 yield `a a b a c a a` rather than
//! `a a a a a b c`, so no backend gets a burst. Weight 0 (draining) takes no slot.

use lb_common::RING_SLOTS;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    #[error("{0} backends with non-zero weight exceed the ring size of {RING_SLOTS}")]
    TooManyBackends(usize),
}

/// The ring for backends with these weights: indices into `weights`, at most `RING_SLOTS` long.
/// Weights are reduced by their greatest common divisor (1:1:1 and 7:7:7 are the same ring), and
/// scaled down proportionally, each non-zero weight keeping at least one slot, when their sum
/// would not fit.
pub fn build(weights: &[u32]) -> Result<Vec<usize>, RingError> {
    let live: Vec<(usize, u64)> = weights
        .iter()
        .enumerate()
        .filter(|(_, w)| **w > 0)
        .map(|(i, w)| (i, u64::from(*w)))
        .collect();
    if live.len() > RING_SLOTS as usize {
        return Err(RingError::TooManyBackends(live.len()));
    }
    if live.is_empty() {
        return Ok(Vec::new());
    }
    let divisor = live.iter().fold(0, |g, (_, w)| gcd(g, *w));
    let mut effective: Vec<u64> = live.iter().map(|(_, w)| w / divisor).collect();
    let total: u64 = effective.iter().sum();
    let slots = u64::from(RING_SLOTS);
    if total > slots {
        // Leave one slot per backend for the `max(1, ..)` so the scaled sum cannot overflow.
        let budget = slots - live.len() as u64;
        for w in &mut effective {
            *w = (*w * budget / total).max(1);
        }
    }
    let total: i64 = effective.iter().map(|w| *w as i64).sum();
    let mut current = vec![0i64; effective.len()];
    let mut ring = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..effective.len() {
            current[i] += effective[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        ring.push(live[best].0);
    }
    Ok(ring)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_weights_are_plain_round_robin() {
        assert_eq!(build(&[1, 1, 1]).unwrap(), vec![0, 1, 2]);
        assert_eq!(build(&[7, 7, 7]).unwrap(), vec![0, 1, 2]);
    }

    #[test]
    fn empty_and_all_drained_rings_are_empty() {
        assert_eq!(build(&[]).unwrap(), Vec::<usize>::new());
        assert_eq!(build(&[0, 0]).unwrap(), Vec::<usize>::new());
    }

    #[test]
    fn zero_weight_takes_no_slot() {
        assert_eq!(build(&[1, 0, 1]).unwrap(), vec![0, 2]);
    }

    #[test]
    fn weighted_ring_is_smooth_and_exact() {
        let ring = build(&[5, 1, 1]).unwrap();
        assert_eq!(ring, vec![0, 0, 1, 0, 2, 0, 0]);
        let ring = build(&[3, 1, 1]).unwrap();
        assert_eq!(ring.iter().filter(|i| **i == 0).count(), 3);
        assert_eq!(ring.len(), 5);
        // Never more than two of the heavy backend in a row for 3:1:1.
        assert!(!ring.windows(3).any(|w| w.iter().all(|i| *i == 0)));
    }

    #[test]
    fn oversized_weights_are_scaled_to_fit() {
        let weights: Vec<u32> = (0..100).map(|i| if i == 0 { 256 } else { 255 }).collect();
        let ring = build(&weights).unwrap();
        assert!(ring.len() <= RING_SLOTS as usize);
        for b in 0..100 {
            assert!(ring.contains(&b), "backend {b} lost its slot");
        }
    }

    #[test]
    fn too_many_backends_is_an_error() {
        let weights = vec![1u32; RING_SLOTS as usize + 1];
        assert_eq!(
            build(&weights),
            Err(RingError::TooManyBackends(RING_SLOTS as usize + 1))
        );
    }
}
