//! Token embedding lookup.

use crate::float::Float;

/// Rows of `table` (`[vocab, c]`) for each token id.
pub fn embedding_forward<F: Float>(table: &[F], ids: &[u32], c: usize) -> Vec<F> {
    let vocab = table.len() / c;
    let mut out = Vec::with_capacity(ids.len() * c);
    for &id in ids {
        let id = id as usize;
        assert!(
            id < vocab,
            "token id {id} out of range for vocabulary of {vocab}"
        );
        out.extend_from_slice(&table[id * c..(id + 1) * c]);
    }
    out
}

/// Adds ∂L/∂table into `dtable` (scatter-add of `dout` rows).
pub fn embedding_backward<F: Float>(dtable: &mut [F], ids: &[u32], dout: &[F], c: usize) {
    for (&id, g) in ids.iter().zip(dout.chunks_exact(c)) {
        let row = &mut dtable[id as usize * c..(id as usize + 1) * c];
        for (a, &b) in row.iter_mut().zip(g) {
            *a += b;
        }
    }
}
