//! Helpers shared by the tests, benches and the device test command: seeded random tensors,
//! error measures and central finite differences.

use crate::float::Float;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal, Uniform};

/// The generator [`rng`] makes (for helpers that take one).
pub type TestRng = ChaCha8Rng;

/// A seeded, portable random generator.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` standard-normal values times `std`.
pub fn randn<F: Float>(rng: &mut ChaCha8Rng, n: usize, std: f64) -> Vec<F> {
    (0..n)
        .map(|_| F::of(std * <StandardNormal as Distribution<f64>>::sample(&StandardNormal, rng)))
        .collect()
}

/// `n` values uniform in `[lo, hi)`.
pub fn uniform<F: Float>(rng: &mut ChaCha8Rng, n: usize, lo: f64, hi: f64) -> Vec<F> {
    let u = Uniform::new(lo, hi);
    (0..n).map(|_| F::of(u.sample(rng))).collect()
}

/// Log-gates ln γ with γ uniform in `[lo, hi)`.
pub fn log_gates<F: Float>(rng: &mut ChaCha8Rng, n: usize, lo: f64, hi: f64) -> Vec<F> {
    uniform::<f64>(rng, n, lo, hi)
        .into_iter()
        .map(|g| F::of(g.ln()))
        .collect()
}

/// Widens to f64.
pub fn to_f64<F: Float>(x: &[F]) -> Vec<f64> {
    x.iter().map(|v| v.f64()).collect()
}

/// Narrows to f32.
pub fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// Norm-wise relative error ‖a − b‖ / ‖b‖ (b the reference); NaN anywhere gives +∞.
pub fn rel_err<A: Float, B: Float>(a: &[A], b: &[B]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_err: length mismatch");
    let mut num = 0.0;
    let mut den = 0.0;
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (x.f64(), y.f64());
        if !x.is_finite() || !y.is_finite() {
            return f64::INFINITY;
        }
        num += (x - y) * (x - y);
        den += y * y;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Finite-difference gradient of a scalar function at `x`, every coordinate, by the
/// fourth-order central stencil (f(x−2h) − 8f(x−h) + 8f(x+h) − f(x+2h)) / 12h: truncation
/// error O(h⁴), so curvature in the function does not pass for a wrong gradient.
pub fn numerical_grad(f: &mut dyn FnMut(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = xp[i];
            let mut at = |dx: f64| {
                xp[i] = x0 + dx;
                f(&xp)
            };
            let g = (at(-2.0 * h) - 8.0 * at(-h) + 8.0 * at(h) - at(2.0 * h)) / (12.0 * h);
            xp[i] = x0;
            g
        })
        .collect()
}

/// A test's base seed: `SYMPOW_TEST_SEED` if set, otherwise drawn from the clock; printed with
/// `label`, so that a failure can be replayed exactly.
pub fn test_seed(label: &str) -> u64 {
    let s = std::env::var("SYMPOW_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos() as u64)
        });
    eprintln!("{label}: SYMPOW_TEST_SEED={s}");
    s
}

/// The metric lines of the run in `dir`, each without its wall-clock throughput: what two runs
/// that computed the same thing must agree on exactly.
pub fn metrics_without_timing(dir: &std::path::Path) -> Vec<String> {
    let path = crate::train::RunPaths::new(dir).metrics;
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).expect("metric lines are JSON");
            if let Some(o) = v.as_object_mut() {
                o.remove("tokens_per_second");
            }
            v.to_string()
        })
        .collect()
}
