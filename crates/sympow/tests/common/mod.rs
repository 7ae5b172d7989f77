//! Shared test set-up: a fresh seed per run (printed, and overridable with SYMPOW_TEST_SEED so
//! a failure can be replayed), random inputs and the f64 rotary used by the references.
#![allow(dead_code)]

use sympow::ops::rotary;

/// The run's base seed: SYMPOW_TEST_SEED if set, otherwise drawn from the clock (printed).
pub fn seed(test: &str) -> u64 {
    sympow::testing::test_seed(test)
}

/// Rotary variants exercised by the tests.
#[derive(Clone, Copy, Debug)]
pub enum Rot {
    None,
    Fixed,
    Learned(rotary::RotaryParam),
}

/// Rotated copies of q and k (`[b, t, h, d]`) in precision F, plus, when learned, the logits
/// used (so the reference can reproduce them).
pub fn apply_rotary<F: sympow::Float>(
    rot: Rot,
    q: &[F],
    k: &[F],
    logits: &[F],
    b: usize,
    t: usize,
    h: usize,
    d: usize,
) -> (Vec<F>, Vec<F>) {
    let angles: Vec<F> = match rot {
        Rot::None => return (q.to_vec(), k.to_vec()),
        Rot::Fixed => rotary::fixed_rotary_angles(b, t, h, d, 10000.0, 0),
        Rot::Learned(param) => {
            rotary::learned_rotary_angles(logits, b, t, h, d, param, 10000.0, None)
        }
    };
    (
        rotary::rotary_forward(q, &angles, d),
        rotary::rotary_forward(k, &angles, d),
    )
}
