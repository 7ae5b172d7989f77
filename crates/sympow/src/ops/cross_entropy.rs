//! Softmax cross-entropy over the vocabulary, fused with its gradient.
//!
//! The logits' rows may be longer than the vocabulary (`row_len ≥ vocab`): the model pads its
//! LM head to a multiple of 64 rows so that the matrix products stay tensor-core aligned
//! ([`Dims::padded_vocab`](crate::model::Dims::padded_vocab)). The padding columns are outside
//! the distribution: they take no part in the softmax and get zero gradient.

use crate::float::Float;
use rayon::prelude::*;

/// Target id that contributes no loss (padding).
pub const IGNORE: u32 = u32::MAX;

/// Per-row losses `−ln softmax(logits[.., ..vocab])[target]` (0 for [`IGNORE`]d rows); `logits`
/// is `[rows, row_len]`.
pub fn cross_entropy_forward<F: Float>(
    logits: &[F],
    targets: &[u32],
    vocab: usize,
    row_len: usize,
) -> Vec<F> {
    assert!(
        vocab <= row_len,
        "vocabulary {vocab} longer than the logits' rows {row_len}"
    );
    logits
        .par_chunks_exact(row_len)
        .zip(targets)
        .map(|(row, &t)| {
            if t == IGNORE {
                return F::zero();
            }
            assert!(
                (t as usize) < vocab,
                "target id {t} out of range for vocabulary of {vocab}"
            );
            row_lse(&row[..vocab]) - row[t as usize]
        })
        .collect()
}

fn row_lse<F: Float>(row: &[F]) -> F {
    let mx = row.iter().copied().fold(F::neg_infinity(), F::max);
    mx + row.iter().map(|&x| (x - mx).exp()).sum::<F>().ln()
}

/// ∂L/∂logits for `L = Σ_rows dloss[row] · loss[row]`: dloss · (softmax − onehot), 0 in the
/// padding columns. `losses` are the forward's: the row's log-sum-exp is `loss + logit[target]`,
/// so the backward reads the logits once instead of twice.
pub fn cross_entropy_backward<F: Float>(
    logits: &[F],
    targets: &[u32],
    losses: &[F],
    dloss: &[F],
    vocab: usize,
    row_len: usize,
) -> Vec<F> {
    let mut d = vec![F::zero(); logits.len()];
    logits
        .par_chunks_exact(row_len)
        .zip(d.par_chunks_exact_mut(row_len))
        .zip(targets)
        .zip(losses.par_iter().zip(dloss))
        .for_each(|(((row, dr), &t), (&loss, &g))| {
            if t == IGNORE {
                return;
            }
            let lse = loss + row[t as usize];
            for (o, &x) in dr[..vocab].iter_mut().zip(row) {
                *o = g * (x - lse).exp();
            }
            dr[t as usize] -= g;
        });
    d
}
