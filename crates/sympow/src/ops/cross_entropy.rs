//! Softmax cross-entropy over the vocabulary, fused with its gradient.

use crate::float::Float;
use rayon::prelude::*;

/// Target id that contributes no loss (padding).
pub const IGNORE: u32 = u32::MAX;

/// Per-row losses −ln softmax(logits)[target] (0 for [`IGNORE`]d rows); `logits` is `[rows, vocab]`.
pub fn cross_entropy_forward<F: Float>(logits: &[F], targets: &[u32], vocab: usize) -> Vec<F> {
    logits
        .par_chunks_exact(vocab)
        .zip(targets)
        .map(|(row, &t)| {
            if t == IGNORE {
                return F::zero();
            }
            assert!(
                (t as usize) < vocab,
                "target id {t} out of range for vocabulary of {vocab}"
            );
            row_lse(row) - row[t as usize]
        })
        .collect()
}

fn row_lse<F: Float>(row: &[F]) -> F {
    let mx = row.iter().copied().fold(F::neg_infinity(), F::max);
    mx + row.iter().map(|&x| (x - mx).exp()).sum::<F>().ln()
}

/// ∂L/∂logits for L = Σ_rows dloss[row] · loss[row]: dloss · (softmax − onehot).
pub fn cross_entropy_backward<F: Float>(
    logits: &[F],
    targets: &[u32],
    dloss: &[F],
    vocab: usize,
) -> Vec<F> {
    let mut d = vec![F::zero(); logits.len()];
    logits
        .par_chunks_exact(vocab)
        .zip(d.par_chunks_exact_mut(vocab))
        .zip(targets)
        .zip(dloss)
        .for_each(|(((row, dr), &t), &g)| {
            if t == IGNORE {
                return;
            }
            let lse = row_lse(row);
            for (o, &x) in dr.iter_mut().zip(row) {
                *o = g * (x - lse).exp();
            }
            dr[t as usize] -= g;
        });
    d
}
