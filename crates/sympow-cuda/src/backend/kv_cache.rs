//! KV-cache decoding on the GPU: a cache that stays on the device
//! ([`Backend::kv_cache_decode_step`](sympow::backend::Backend::kv_cache_decode_step)), for
//! softmax and for sympow whose recurrent state would be larger (p = 4).
//!
//! Keys `[batch, cap, heads, dk]` and values `[batch, cap, heads, dv]` in f32, the forward's
//! layout with room for `cap` tokens per sequence, and for gated attention each token's
//! cumulative log gate `[batch, cap, heads]` in f64; when a step finds the cache full, it moves
//! to one of twice the room (amortised O(1) per token). A step appends its token, then reads the
//! cache in flash-decoding's two passes (`kernels/decode.cu`): blocks of [`KV_SPLIT`] keys each
//! write their running max, sum and weighted values (the log-weights of the quadratic form:
//! softmax's score, or p·ln|score|, plus the gates' G_t − G_s); one block per head combines
//! them. Every key and value is read once per step: the cost grows linearly with the context,
//! which is what a cache pays and sympow's recurrent state does not.
//!
//! The step's kernels take the tokens cached from a count on the device, which they advance
//! themselves, and run over every split of the room (those past the keys write nothing that
//! counts): so a step recorded as a CUDA graph ([`Backend::record`]) stays right as the cache
//! fills, until the cache has to move ([`Backend::kv_cache_reserve`]).
//!
//! [`Backend::record`]: sympow::backend::Backend::record
//! [`Backend::kv_cache_reserve`]: sympow::backend::Backend::kv_cache_reserve

use super::CudaBackend;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use sympow::attention::{AttentionSpec, Kernel, Shape};

/// Keys per block of `kv_decode_partial` (`KV_SPLIT` in decode.cu).
pub(super) const KV_SPLIT: usize = 256;
/// Threads per block of the decode kernels (a power of two: their reductions halve it).
const THREADS: u32 = 128;

/// The KV caches of the sequences being generated, on the GPU.
pub struct CudaKvCache {
    keys: CudaSlice<f32>,
    values: CudaSlice<f32>,
    /// Gated attention: every cached token's cumulative log gate G_s (f64: G_t − G_s must stay
    /// exact however long the context).
    gates: Option<CudaSlice<f64>>,
    /// Tokens cached per sequence, as the steps' kernels count them (one `i32`).
    len_dev: CudaSlice<i32>,
    /// The same count as the host last knew it (a replayed step advances only the device's
    /// until the next [`reserve`](CudaBackend::reserve_kv_cache)), and the room.
    len: usize,
    cap: usize,
    batch: usize,
    heads: usize,
    dk: usize,
    dv: usize,
}

impl sympow::backend::Footprint for CudaKvCache {
    fn bytes(&self) -> usize {
        (self.keys.len() + self.values.len()) * std::mem::size_of::<f32>()
            + self
                .gates
                .as_ref()
                .map_or(0, |g| g.len() * std::mem::size_of::<f64>())
    }
}

impl CudaKvCache {
    /// Tokens cached per sequence, as of the last step run op by op or the last
    /// [`kv_cache_reserve`](sympow::backend::Backend::kv_cache_reserve) (a replayed step is
    /// counted on the device only).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl CudaBackend {
    /// `dst[b][r] = src[b][r]` for `rows` rows of `width` elements (f32 keys and values, f64
    /// gates) per sequence; `src` holds `src_cap` rows a sequence, `dst` `dst_cap`.
    fn copy_cache_rows<T: cudarc::driver::DeviceRepr>(
        &self,
        dst: &mut CudaSlice<T>,
        src: &CudaSlice<T>,
        batch: usize,
        rows: usize,
        width: usize,
        (src_cap, dst_cap): (usize, usize),
    ) {
        assert!(
            src.len() >= batch * src_cap * width
                && dst.len() >= batch * dst_cap * width
                && rows <= src_cap
                && rows <= dst_cap,
            "KV cache copy out of bounds"
        );
        let (r, w, sc, dc) = (rows as i32, width as i32, src_cap as i32, dst_cap as i32);
        let kernel = match std::mem::size_of::<T>() {
            4 => "kv_cache_copy",
            8 => "kv_cache_copy_f64",
            _ => unreachable!("KV caches hold f32 and f64"),
        };
        launch!(
            self,
            kernel,
            LaunchConfig {
                grid_dim: ((rows * width).div_ceil(256).max(1) as u32, batch as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
            dst,
            src,
            &r,
            &w,
            &sc,
            &dc
        );
    }

    pub(super) fn new_kv_cache(
        &self,
        shape: &Shape,
        keys: &CudaSlice<f32>,
        values: &CudaSlice<f32>,
        log_gates: Option<&CudaSlice<f32>>,
    ) -> CudaKvCache {
        let (b, t, h) = (shape.batch, shape.time, shape.heads);
        assert!(
            keys.len() == b * t * h * shape.dk
                && values.len() == b * t * h * shape.dv
                && log_gates.is_none_or(|g| g.len() == b * t * h),
            "a KV cache takes keys [batch, time, heads, dk], values [batch, time, heads, dv] and log gates [batch, time, heads]"
        );
        // room for the prompt and at least one more token, in whole splits: a prompt of a
        // round length does not double the cache at the first step
        let cap = (t + 1).next_multiple_of(KV_SPLIT);
        let len = i32::try_from(t).expect("a KV cache holds fewer than 2^31 tokens");
        // the prompt's cumulative gates, summed in f64 on the host (at the prefill, not in a
        // step: b·t·h numbers)
        let gates = log_gates.map(|g| {
            let g = self.stream.clone_dtoh(g).expect("device to host copy");
            let mut cum = vec![0.0f64; b * cap * h];
            for bi in 0..b {
                let mut acc = vec![0.0f64; h];
                for ti in 0..t {
                    for (hh, a) in acc.iter_mut().enumerate() {
                        *a += f64::from(g[(bi * t + ti) * h + hh]);
                        cum[(bi * cap + ti) * h + hh] = *a;
                    }
                }
            }
            self.stream.clone_htod(&cum).expect("host to device copy")
        });
        let mut cache = CudaKvCache {
            keys: self.alloc(b * cap * h * shape.dk),
            values: self.alloc(b * cap * h * shape.dv),
            gates,
            len_dev: self.stream.clone_htod(&[len]).expect("host to device copy"),
            len: t,
            cap,
            batch: b,
            heads: h,
            dk: shape.dk,
            dv: shape.dv,
        };
        if t > 0 {
            self.copy_cache_rows(&mut cache.keys, keys, b, t, h * shape.dk, (t, cap));
            self.copy_cache_rows(&mut cache.values, values, b, t, h * shape.dv, (t, cap));
        }
        cache
    }

    /// Moves the cache into buffers of `cap` rows a sequence (a multiple of [`KV_SPLIT`], more
    /// than it holds).
    fn grow(&self, c: &mut CudaKvCache, cap: usize) {
        debug_assert!(cap > c.cap && cap.is_multiple_of(KV_SPLIT));
        for (buf, w) in [
            (&mut c.keys, c.heads * c.dk),
            (&mut c.values, c.heads * c.dv),
        ] {
            let mut bigger = self.alloc(c.batch * cap * w);
            self.copy_cache_rows(&mut bigger, buf, c.batch, c.len, w, (c.cap, cap));
            *buf = bigger;
        }
        if let Some(g) = &mut c.gates {
            let mut bigger = crate::device::alloc_output(&self.stream, c.batch * cap * c.heads);
            self.copy_cache_rows(&mut bigger, g, c.batch, c.len, c.heads, (c.cap, cap));
            *g = bigger;
        }
        c.cap = cap;
    }

    /// [`Backend::kv_cache_reserve`](sympow::backend::Backend::kv_cache_reserve): the host's
    /// count set to `len`, the cache moved (to twice the room, or more) where `more` tokens
    /// would not fit.
    pub(super) fn reserve_kv_cache(&self, c: &mut CudaKvCache, len: usize, more: usize) -> bool {
        assert!(
            c.len <= len && len <= c.cap,
            "KV cache: {len} tokens reserved for, but the host counted {} and there is room for {}",
            c.len,
            c.cap
        );
        c.len = len;
        if len + more <= c.cap {
            return false;
        }
        let cap = (2 * c.cap).max((len + more).next_multiple_of(KV_SPLIT));
        self.grow(c, cap);
        true
    }

    pub(super) fn kv_cache_decode(
        &self,
        spec: &AttentionSpec,
        c: &mut CudaKvCache,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        log_gates: Option<&CudaSlice<f32>>,
    ) -> CudaSlice<f32> {
        let (bh, dk, dv) = (c.batch * c.heads, c.dk, c.dv);
        assert!(
            q.len() == bh * dk && k.len() == bh * dk && v.len() == bh * dv,
            "decode step: q, k must be [batch·heads, dk] and v [batch·heads, dv] of the cache's shape"
        );
        assert!(
            log_gates.is_some() == c.gates.is_some() && log_gates.is_none_or(|g| g.len() == bh),
            "decode step: a gated cache takes log gates [batch·heads], an ungated one none"
        );
        self.reserve_kv_cache(c, c.len, 1);
        let (b, cap) = (c.batch, c.cap as i32);
        for (buf, src, w) in [
            (&mut c.keys, k, c.heads * dk),
            (&mut c.values, v, c.heads * dv),
        ] {
            let wi = w as i32;
            launch!(
                self,
                "kv_cache_append",
                LaunchConfig {
                    grid_dim: (w.div_ceil(256) as u32, b as u32, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
                buf,
                src,
                &c.len_dev,
                &wi,
                &cap
            );
        }
        if let (Some(gates), Some(lg)) = (&mut c.gates, log_gates) {
            let heads = c.heads as i32;
            launch!(
                self,
                "kv_cache_gate_append",
                LaunchConfig {
                    grid_dim: (b as u32, 1, 1),
                    block_dim: (c.heads.next_multiple_of(32) as u32, 1, 1),
                    shared_mem_bytes: 0,
                },
                gates,
                lg,
                &c.len_dev,
                &heads,
                &cap
            );
        }
        c.len += 1;

        // every split of the room, not of the length: a recorded step's grid stays as it was
        let splits = c.cap / KV_SPLIT;
        let mut part_acc = self.alloc(bh * splits * dv);
        let mut part_ml = self.alloc(bh * splits * 2);
        let heads = c.heads as i32;
        let (di, ei, scale) = (dk as i32, dv as i32, spec.scale as f32);
        let power = match spec.kernel {
            Kernel::Power(p) => p as f32,
            Kernel::Softmax => 0.0,
        };
        let cfg = LaunchConfig {
            grid_dim: (splits as u32, bh as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: ((dk.next_multiple_of(4) + KV_SPLIT + 4 * THREADS as usize) * 4)
                as u32,
        };
        let mut l = self.stream.launch_builder(&self.fns["kv_decode_partial"]);
        l.arg(&mut part_acc)
            .arg(&mut part_ml)
            .arg(q)
            .arg(&c.keys)
            .arg(&c.values);
        match &c.gates {
            Some(g) => l.arg(g),
            None => l.arg(&super::NULL), // ungated: no decay
        };
        l.arg(&c.len_dev)
            .arg(&cap)
            .arg(&heads)
            .arg(&di)
            .arg(&ei)
            .arg(&scale)
            .arg(&power);
        // SAFETY: the arguments match kv_decode_partial in decode.cu; the grid covers the
        // cache's room, whose rows the kernel reads up to the count on the device
        unsafe { l.launch(cfg) }.unwrap_or_else(|e| panic!("CUDA kernel kv_decode_partial: {e}"));
        let mut y = self.alloc(bh * dv);
        let (si, eps) = (splits as i32, spec.eps as f32);
        launch!(
            self,
            "kv_decode_combine",
            LaunchConfig {
                grid_dim: (bh as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
            &mut y,
            &part_acc,
            &part_ml,
            &si,
            &ei,
            &eps,
            &mut c.len_dev
        );
        y
    }
}
