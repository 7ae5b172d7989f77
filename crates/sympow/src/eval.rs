//! Loss as a function of context position (SPEC §8), the paper's evaluation.
//!
//! Validation windows start at document starts (then continue in consecutive windows of the
//! same document); the per-token loss at each position is averaged over windows and bucketed.

use crate::backend::Backend;
use crate::data::TokenData;
use crate::model::Model;
use crate::ops::cross_entropy::IGNORE;
use crate::Float;
use std::path::Path;

/// Mean loss of one range of positions.
#[derive(Clone, Debug, PartialEq)]
pub struct Bucket {
    /// First position (0-based, inclusive).
    pub start: usize,
    /// End position (exclusive).
    pub end: usize,
    /// Mean loss in nats per token.
    pub loss: f64,
    /// Tokens averaged.
    pub tokens: u64,
}

/// Per-position losses of `model` on up to `max_windows` validation windows of `context`
/// tokens, averaged into `buckets` equal ranges of positions.
pub fn loss_by_position<B: Backend>(
    model: &Model<B>,
    data: &TokenData,
    context: usize,
    max_windows: usize,
    batch: usize,
    buckets: usize,
) -> Vec<Bucket> {
    let windows = data.eval_windows(context, max_windows);
    let mut sum = vec![0.0f64; context];
    let mut count = vec![0u64; context];
    for group in windows.chunks(batch.max(1)) {
        let ids: Vec<u32> = group.iter().flat_map(|b| b.ids.iter().copied()).collect();
        let targets: Vec<u32> = group
            .iter()
            .flat_map(|b| b.targets.iter().copied())
            .collect();
        let tr = model.forward(&ids, Some(&targets), group.len(), context, None);
        let losses = model
            .backend
            .download(tr.losses.as_ref().expect("targets given"));
        for (i, (l, &t)) in losses.iter().zip(&targets).enumerate() {
            if t != IGNORE {
                sum[i % context] += l.f64();
                count[i % context] += 1;
            }
        }
    }
    let nb = buckets.clamp(1, context);
    (0..nb)
        .map(|k| {
            let (start, end) = (k * context / nb, (k + 1) * context / nb);
            let (s, n) = (
                sum[start..end].iter().sum::<f64>(),
                count[start..end].iter().sum::<u64>(),
            );
            Bucket {
                start,
                end,
                loss: if n > 0 { s / n as f64 } else { f64::NAN },
                tokens: n,
            }
        })
        .collect()
}

/// Writes buckets as CSV (`position_start,position_end,loss,tokens`).
pub fn write_csv(path: &Path, buckets: &[Bucket]) -> std::io::Result<()> {
    let mut s = String::from("position_start,position_end,loss,tokens\n");
    for b in buckets {
        s.push_str(&format!(
            "{},{},{:.6},{}\n",
            b.start, b.end, b.loss, b.tokens
        ));
    }
    crate::checkpoint::write_atomic(path, s.as_bytes())
}

/// Reads a CSV written by [`write_csv`].
pub fn read_csv(path: &Path) -> Result<Vec<Bucket>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .skip(1)
        .enumerate()
        .map(|(i, l)| {
            let f: Vec<&str> = l.split(',').collect();
            let bad = || {
                format!(
                    "{}:{}: expected position_start,position_end,loss,tokens",
                    path.display(),
                    i + 2
                )
            };
            if f.len() != 4 {
                return Err(bad());
            }
            Ok(Bucket {
                start: f[0].parse().map_err(|_| bad())?,
                end: f[1].parse().map_err(|_| bad())?,
                loss: f[2].parse().map_err(|_| bad())?,
                tokens: f[3].parse().map_err(|_| bad())?,
            })
        })
        .collect()
}

/// The paper's figure: loss against position, one line per run.
pub fn plot(path: &Path, title: &str, runs: &[(String, Vec<Bucket>)]) -> Result<(), String> {
    let series: Vec<crate::plot::Series> = runs
        .iter()
        .map(|(label, b)| crate::plot::Series {
            label: label.clone(),
            points: b
                .iter()
                .map(|b| ((b.start + b.end) as f64 / 2.0, b.loss))
                .collect(),
        })
        .collect();
    crate::plot::line_plot(
        path,
        title,
        "position in context (tokens)",
        "loss (nats/token)",
        &series,
        false,
    )
}
