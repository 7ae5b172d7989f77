//! Where a training step's GPU time goes, op by op (`sympow bench train --profile`).
//!
//! When on, every `Backend` op of [`crate::CudaBackend`] synchronises the stream before and
//! after itself and adds the wall time between to its row. The synchronisations remove the
//! overlap of host and device work, so a profiled step is slower than a plain one; the table
//! says where the device time goes, not how long an unprofiled step takes. Ops called from
//! inside another op are counted in the outer one.

use cudarc::driver::CudaStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;
use sympow::backend::ProfileRow;

/// Per-op timer of one backend.
#[derive(Default)]
pub(crate) struct Profiler {
    on: AtomicBool,
    depth: AtomicUsize,
    rows: Mutex<Vec<ProfileRow>>,
}

/// Times one op from its creation to its drop (outermost ops only).
pub(crate) struct OpTimer<'a> {
    prof: &'a Profiler,
    stream: &'a CudaStream,
    op: &'static str,
    start: Option<Instant>,
}

impl Profiler {
    pub(crate) fn set(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
        self.rows.lock().expect("profiler lock").clear();
    }

    /// Whether ops are being timed (each synchronises the stream: nothing records then).
    pub(crate) fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// A timer for `op`, or `None` when profiling is off.
    pub(crate) fn time<'a>(
        &'a self,
        stream: &'a CudaStream,
        op: &'static str,
    ) -> Option<OpTimer<'a>> {
        if !self.on.load(Ordering::Relaxed) {
            return None;
        }
        let outer = self.depth.fetch_add(1, Ordering::Relaxed) == 0;
        let start = outer.then(|| {
            stream.synchronize().expect("stream synchronisation");
            Instant::now()
        });
        Some(OpTimer {
            prof: self,
            stream,
            op,
            start,
        })
    }

    /// The rows so far, most time first.
    pub(crate) fn report(&self) -> Vec<ProfileRow> {
        let mut rows = self.rows.lock().expect("profiler lock").clone();
        rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        rows
    }
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        if let Some(start) = self.start {
            self.stream.synchronize().expect("stream synchronisation");
            let dt = start.elapsed().as_secs_f64();
            let mut rows = self.prof.rows.lock().expect("profiler lock");
            match rows.iter_mut().find(|r| r.op == self.op) {
                Some(r) => {
                    r.calls += 1;
                    r.seconds += dt;
                }
                None => rows.push(ProfileRow {
                    op: self.op,
                    calls: 1,
                    seconds: dt,
                }),
            }
        }
        self.prof.depth.fetch_sub(1, Ordering::Relaxed);
    }
}
