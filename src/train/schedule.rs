//! Learning-rate schedules: an optional linear warm-up from 0, then linear decay to 0 (the paper's,
//! without warm-up) or half a cosine.

use super::Schedule;

/// The rate of update `step` (0-based) of `total`, peaking at `base` after `warmup` steps.
pub fn learning_rate(base: f64, step: u64, total: u64, warmup: u64, schedule: Schedule) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let done = (step - warmup).min(total.saturating_sub(warmup)) as f64 / span;
    match schedule {
        Schedule::Linear => base * (1.0 - done),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * done).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_without_warmup_is_the_papers_decay() {
        let lr: Vec<f64> = (0..4).map(|s| learning_rate(1.0, s, 4, 0, Schedule::Linear)).collect();
        assert_eq!(lr, vec![1.0, 0.75, 0.5, 0.25]);
    }

    #[test]
    fn warmup_climbs_to_the_base_then_the_schedule_takes_over() {
        let lr: Vec<f64> = (0..6).map(|s| learning_rate(2.0, s, 6, 2, Schedule::Cosine)).collect();
        assert_eq!(&lr[..3], &[1.0, 2.0, 2.0]);
        // Cosine over the 4 steps after the warm-up: 1, (1+cos(pi/4))/2, 1/2, (1+cos(3pi/4))/2.
        let want = [
            0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos()),
            0.5,
            0.5 * (1.0 + (3.0 * std::f64::consts::PI / 4.0).cos()),
        ];
        for (got, w) in lr[3..].iter().zip(want) {
            assert!((got - 2.0 * w).abs() < 1e-12, "{lr:?}");
        }
        assert!(learning_rate(1.0, 9, 6, 2, Schedule::Linear).abs() < 1e-12, "past the end: 0");
    }
}
