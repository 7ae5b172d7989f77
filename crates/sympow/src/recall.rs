//! Multi-query associative recall (MQAR): a direct probe of how many key–value pairs an
//! attention's state can hold and give back, as the number of pairs and the distance grow.
//!
//! A sequence lists `pairs` key–value pairs, then `gap` filler tokens, then asks for every key
//! again (in a shuffled order), each query followed by its value:
//!
//! ```text
//! k₁ v₁ k₂ v₂ … k_N v_N | f f f … f (gap) | k_π1 v_π1 k_π2 v_π2 … | f f … (to the end)
//! ```
//!
//! Keys are distinct within a sequence; values are drawn independently, so a value is only
//! predictable from the pair listed earlier. A model is trained on such sequences as ordinary
//! next-token text (byte vocabulary) and scored at the query keys: a pair counts as recalled when
//! the model puts more than half its probability on the right value (which makes it the argmax).
//! The distance a query reaches back is `gap` + 2·`pairs` tokens on average.

use crate::backend::Backend;
use crate::model::Model;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Filler token ids.
pub const FILLER: std::ops::Range<u32> = 0..16;
/// Key token ids (at most 120 distinct keys per sequence).
pub const KEYS: std::ops::Range<u32> = 16..136;
/// Value token ids.
pub const VALUES: std::ops::Range<u32> = 136..256;

/// One recall sequence of `len` tokens and the positions of its query keys (the value to
/// recall is the next token).
pub fn sequence(
    rng: &mut impl Rng,
    pairs: usize,
    gap: usize,
    len: usize,
) -> (Vec<u32>, Vec<usize>) {
    assert!(
        pairs <= KEYS.len() && 4 * pairs + gap <= len,
        "{pairs} pairs and a gap of {gap} do not fit in {len} tokens"
    );
    let mut keys: Vec<u32> = KEYS.collect();
    keys.shuffle(rng);
    keys.truncate(pairs);
    let values: Vec<u32> = (0..pairs).map(|_| rng.gen_range(VALUES)).collect();
    let mut ids = Vec::with_capacity(len);
    for (k, v) in keys.iter().zip(&values) {
        ids.extend([*k, *v]);
    }
    ids.extend((0..gap).map(|_| rng.gen_range(FILLER)));
    let mut order: Vec<usize> = (0..pairs).collect();
    order.shuffle(rng);
    let mut queries = Vec::with_capacity(pairs);
    for i in order {
        queries.push(ids.len());
        ids.extend([keys[i], values[i]]);
    }
    while ids.len() < len {
        ids.push(rng.gen_range(FILLER));
    }
    (ids, queries)
}

/// `rows` training sequences of `len` tokens, each with a number of pairs drawn from
/// `pair_choices` and a gap uniform over what fits, as one flat row-major buffer, and the
/// answers' mask of the same shape (1 at each queried value: the loss mask that trains on the
/// answers only, as MQAR is usually trained).
pub fn training_rows(
    seed: u64,
    rows: usize,
    len: usize,
    pair_choices: &[usize],
) -> (Vec<u16>, Vec<u16>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut ids, mut mask) = (Vec::with_capacity(rows * len), vec![0u16; rows * len]);
    for r in 0..rows {
        let pairs = *pair_choices.choose(&mut rng).expect("some pair counts");
        let gap = rng.gen_range(0..=len - 4 * pairs);
        let (seq, queries) = sequence(&mut rng, pairs, gap, len);
        ids.extend(seq.iter().map(|&t| t as u16));
        for q in queries {
            mask[r * len + q + 1] = 1;
        }
    }
    (ids, mask)
}

/// Fraction of the pairs of `sequences` fresh sequences (`pairs` pairs, a gap of `gap`, `len`
/// tokens) that `model` recalls, and its mean loss at those positions.
pub fn recall_rate<B: Backend>(
    model: &Model<B>,
    pairs: usize,
    gap: usize,
    len: usize,
    sequences: usize,
    seed: u64,
) -> (f64, f64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ((pairs as u64) << 32) ^ gap as u64);
    let (mut hit, mut loss, mut n) = (0usize, 0.0, 0usize);
    let batch = 8;
    let mut left = sequences;
    while left > 0 {
        let b = batch.min(left);
        left -= b;
        let (mut ids, mut targets, mut asked) = (Vec::new(), Vec::new(), Vec::new());
        for s in 0..b {
            let (seq, queries) = sequence(&mut rng, pairs, gap, len + 1);
            ids.extend_from_slice(&seq[..len]);
            targets.extend_from_slice(&seq[1..]);
            asked.extend(queries.iter().map(|q| s * len + q));
        }
        let trace = model.forward(&ids, Some(&targets), b, len, None);
        let losses = model
            .backend
            .download(trace.losses.as_ref().expect("targets given"));
        for &i in &asked {
            let l = crate::Float::f64(losses[i]);
            hit += usize::from(l < std::f64::consts::LN_2);
            loss += l;
            n += 1;
        }
    }
    (hit as f64 / n.max(1) as f64, loss / n.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_ask_for_every_listed_pair_once() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (ids, queries) = sequence(&mut rng, 10, 17, 80);
        assert_eq!(ids.len(), 80);
        assert_eq!(queries.len(), 10);
        let listed: Vec<(u32, u32)> = ids[..20].chunks(2).map(|p| (p[0], p[1])).collect();
        let mut asked: Vec<(u32, u32)> = queries.iter().map(|&q| (ids[q], ids[q + 1])).collect();
        assert!(ids[20..37].iter().all(|t| FILLER.contains(t)));
        assert_eq!(queries[0], 37);
        let mut sorted = listed.clone();
        sorted.sort();
        asked.sort();
        assert_eq!(asked, sorted, "every pair asked once, with its value");
        let mut keys: Vec<u32> = listed.iter().map(|p| p.0).collect();
        assert!(listed
            .iter()
            .all(|(k, v)| KEYS.contains(k) && VALUES.contains(v)));
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 10, "keys are distinct");
    }

    #[test]
    fn training_rows_fit_use_the_byte_vocabulary_and_mask_the_answers() {
        let (rows, mask) = training_rows(1, 20, 64, &[2, 8, 16]);
        assert_eq!((rows.len(), mask.len()), (20 * 64, 20 * 64));
        assert!(rows.iter().all(|&t| t < 256));
        assert_eq!(
            (rows.clone(), mask.clone()),
            training_rows(1, 20, 64, &[2, 8, 16])
        );
        for r in 0..20 {
            let (row, m) = (&rows[r * 64..(r + 1) * 64], &mask[r * 64..(r + 1) * 64]);
            let answers: Vec<usize> = (0..64).filter(|&j| m[j] == 1).collect();
            assert!([2, 8, 16].contains(&answers.len()), "one answer per pair");
            for &j in &answers {
                // a value, right after a key that was listed earlier with that value
                assert!(VALUES.contains(&(row[j] as u32)) && KEYS.contains(&(row[j - 1] as u32)));
                let first = row.iter().position(|&t| t == row[j - 1]).unwrap();
                assert!(first < j - 1 && row[first + 1] == row[j]);
            }
        }
    }
}
