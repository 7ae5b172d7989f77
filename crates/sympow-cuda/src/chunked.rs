//! Host side of the fused chunked sympow kernels (`kernels/sympow_chunked.cu`): p = 2 on
//! tensor cores (bf16 operands, f32 accumulation), head dimension 32, 64 or 128 with dk = dv.
//!
//! The forward is six launches — prep (cumulative gates, bf16 staging), chunk states (each
//! chunk's φ(K̃)ᵀV, in parallel) and Gram matrices (K̃ᵀK̃: the denominator's state, kept apart
//! so that the numerator's has D columns, not D + 1 padded to 16), discounted cumsum (in place,
//! both), read (the inter-chunk numerator), intra (attention inside each chunk, plus the
//! combine) — and the backward nine to eleven (output gradients, state gradients and their
//! reverse cumsum, the reads of ∂q and of ∂k and ∂v, the intra-chunk ∂k∂v and ∂q, each ending in
//! the chain rule to the model's tensors, and with gates their scan; the ∂q read and
//! intra-chunk ∂q on a second stream), each the GPU twin of a step of
//! `sympow::attention::chunked` (SPEC §4). The forward hands its bf16 operands and chunk states
//! to the backward through [`AttentionOut::saved`]. Memory is linear in T: one D×D×D bf16 state
//! and one D×D Gram matrix per chunk of `chunk` tokens (on Hopper the state tile-packed: the
//! symmetric state's index pairs with tile(a) ≤ tile(b) of 16-wide tiles, 5/8 of that at D = 64).
//!
//! On Hopper (compute capability 9.0) the state products — chunk states and the reads of r or
//! dx (both: one pass each) — run on `wgmma` (kernels compiled for `compute_90a`); elsewhere, or
//! with `SYMPOW_NO_WGMMA` set, on `mma.sync`.

use crate::device::alloc_output;
use cudarc::driver::sys::{self, CUtensorMap};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PushKernelArg,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use sympow::attention::{AttentionGrads, AttentionOut, AttentionSpec, Kernel, Shape};

pub(crate) const SOURCE: &str = concat!(
    include_str!("../kernels/reduce.cuh"),
    include_str!("../kernels/mma.cuh"),
    include_str!("../kernels/wgmma.cuh"),
    include_str!("../kernels/sympow_chunked.cu")
);
/// Each kernel (instantiated per head dimension as `{name}_{d}`) with its entry in the
/// `sp_smem_sizes` table (None: no dynamic shared memory).
const KERNELS: [(&str, Option<usize>); 10] = [
    ("sp_prep", Some(0)),
    ("sp_chunk_states", Some(1)),
    ("sp_chunk_gram", None),
    ("sp_read_r", Some(2)),
    ("sp_read_dx", Some(3)),
    ("sp_read_rdx", Some(4)),
    ("sp_intra_fwd", Some(5)),
    ("sp_intra_bwd_dkv", Some(6)),
    ("sp_intra_bwd_dq", Some(7)),
    ("sp_bwd_prep", None),
];
/// The kernels with one instance for every head dimension (no dynamic shared memory).
const SHARED_KERNELS: [&str; 3] = ["sp_discumsum_all", "sp_gate_chunk_sums", "sp_bwd_gates"];
/// Entries per head dimension of the `sp_smem_sizes` table (SMEM_ENTRIES in the kernel source):
/// the kernels' shared-memory bytes, then [`BlockShape`]'s four.
const SMEM_ENTRIES: usize = 12;
/// Head dimensions the kernels are instantiated for (SP_INSTANCES in the kernel source).
pub const HEAD_DIMS: [usize; 3] = crate::FUSED_HEAD_DIMS;
const THREADS: u32 = 256;
/// bf16 elements per thread of `sp_discumsum_all` (DISC_VEC in the kernel source).
const DISC_VEC: usize = 8;
const NULL: u64 = 0;
/// Tensor maps a `sp_read_dx` launch takes (GATHER_MAPS in the kernel source): one for each tile
/// of the first index but the last, at D = 128.
const GATHER_MAPS: usize = 7;

/// The ∂x read's gathered rows on `wgmma` (the kernel's `GatherMaps`, passed by value): for slice
/// b, the rows S[a][b] of an earlier tile of a. Map `ta` views the whole tile-packed state
/// tensor (in core-matrix order) as 5-D, innermost first: the 64 elements of an 8-row group's
/// core matrix (row b's 8 columns: box 8 at (b mod 8)·8), a within its group of 8 (its rows
/// (D − 16·ta)·E elements apart), the E/8 pieces (128 bytes apart), the two groups of 8 a
/// (8 rows of a apart), and the 8-row groups of the whole tensor (the chunk's first, plus the
/// offset of row (16·ta, b)). A box lands in shared memory as the stage keeps rows: core-matrix
/// order, [group of a][piece][a][8 columns].
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct GatherMaps([CUtensorMap; GATHER_MAPS]);
// SAFETY: plain bytes, laid out as the kernel's GatherMaps (7 × 128 bytes, 64-byte aligned).
unsafe impl DeviceRepr for GatherMaps {}

/// How the compiled kernels tile the state products, per head dimension (the last entries of
/// the kernel's `sp_smem_sizes` table: they differ between the `mma.sync` and `wgmma` forms).
#[derive(Clone, Copy, Debug)]
struct BlockShape {
    /// Tokens per `sp_read` block.
    read_rows: usize,
    /// `sp_chunk_states` blocks per chunk.
    states_blocks: usize,
    /// Whether the state products run on Hopper's `wgmma`.
    wgmma: bool,
    /// Rows (E wide) of a chunk's slot: its state's — D² in full, fewer tile-packed (the `wgmma`
    /// forms keep only the index pairs whose 16-wide tiles have tile(a) ≤ tile(b); S is
    /// symmetric) — then the D of its Gram matrix.
    slot_rows: usize,
}

/// The compiled kernels and their shared-memory needs.
pub struct ChunkedSympow {
    _module: Arc<CudaModule>,
    fns: HashMap<String, CudaFunction>,
    /// Dynamic shared-memory bytes per kernel instance (`{name}_{d}`); prep is absent: it
    /// scales with the chunk and is sized at launch.
    smem: HashMap<String, u32>,
    /// Per head dimension.
    shapes: HashMap<usize, BlockShape>,
    /// When on, each stage synchronises and its wall time is recorded (for `bench attention
    /// --stages`); off in normal runs.
    profile: Mutex<Option<Vec<(&'static str, f64)>>>,
    /// A second stream, for the backward's ∂q half beside its ∂k∂v half.
    side: Arc<CudaStream>,
}

/// bf16 staging copies of one call's inputs (see `sp_prep`).
struct Staged {
    qs: CudaSlice<u16>,
    kr: CudaSlice<u16>,
    qt: CudaSlice<u16>,
    kt: CudaSlice<u16>,
    vp: CudaSlice<u16>,
    g: CudaSlice<f32>,
    gam: CudaSlice<f32>,
}

/// What the forward keeps for the backward (in [`AttentionOut::saved`]): the bf16 operands and
/// the discounted chunk states, which the backward would otherwise recompute (prep, chunk
/// states and cumsum: about 15 % of a forward+backward). Memory: the states are D·D·E bf16
/// numbers per chunk and head (5/8 of that tile-packed at D = 64), the Gram matrices D·D; with
/// the operands ≈ 1.3 KiB per token and head at d = 64 on Hopper (c = 512: 0.66 KiB of state,
/// 0.63 KiB of bf16 operands).
struct FusedSaved {
    staged: Staged,
    states: CudaSlice<u16>,
    /// The chunk length they were made with.
    l: usize,
}

/// Geometry of one call.
#[derive(Clone, Copy)]
struct Geo {
    bh: usize,
    t: usize,
    h: usize,
    d: usize,
    e: usize,
    l: usize,
    nc: usize,
}

impl Geo {
    fn new(s: &Shape, chunk: usize) -> Self {
        let l = chunk.min(s.time.next_multiple_of(128)).max(128);
        Geo {
            bh: s.batch * s.heads,
            t: s.time,
            h: s.heads,
            d: s.dk,
            // v's (E in the kernel source; the denominator has a state of its own)
            e: s.dv,
            l,
            nc: s.time.div_ceil(l),
        }
    }
    /// Blocks per (bh, chunk) of the 128-row tile kernels.
    fn tiles(&self) -> usize {
        self.l / 128
    }
}

/// The kernels' source: the one built in, or — for trying a kernel change on the GPU machine,
/// which has no cargo — `sympow_chunked.cu` replaced by the file that `SYMPOW_CHUNKED_CU` names
/// (the headers stay the built-in ones; the host reads every shape from the source's
/// `sp_smem_sizes` table, so a variant may change its tiles). Said on stderr when used.
fn kernel_source() -> Result<std::borrow::Cow<'static, str>, String> {
    let path = std::env::var_os("SYMPOW_CHUNKED_CU");
    let source = kernel_source_from(path.as_deref())?;
    if let Some(path) = path {
        eprintln!(
            "fused chunked sympow: kernels from {} (SYMPOW_CHUNKED_CU)",
            path.to_string_lossy()
        );
    }
    Ok(source)
}

fn kernel_source_from(
    chunked_cu: Option<&std::ffi::OsStr>,
) -> Result<std::borrow::Cow<'static, str>, String> {
    let Some(path) = chunked_cu else {
        return Ok(SOURCE.into());
    };
    let file = std::fs::read_to_string(path)
        .map_err(|e| format!("SYMPOW_CHUNKED_CU={}: {e}", path.to_string_lossy()))?;
    let headers = SOURCE
        .strip_suffix(include_str!("../kernels/sympow_chunked.cu"))
        .expect("SOURCE ends with sympow_chunked.cu");
    Ok(format!("{headers}{file}").into())
}

fn cfg(grid: (usize, usize, usize), smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem,
    }
}

impl ChunkedSympow {
    /// Compiles the kernels for compute capability ≥ 8.0 (mma.sync bf16) and sizes their
    /// shared memory. An error (old GPU, NVRTC failure) means the caller keeps its other path.
    pub fn new(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>) -> Result<Self, String> {
        let source = kernel_source()?;
        let (module, sizes) = crate::device::load_tensor_core_module(
            ctx,
            stream,
            &source,
            "fused chunked sympow",
            true,
            "sp_smem_sizes",
            SMEM_ENTRIES * HEAD_DIMS.len(),
        )?;
        let mut fns = HashMap::new();
        let mut smem = HashMap::new();
        let mut shapes = HashMap::new();
        for (i, &d) in HEAD_DIMS.iter().enumerate() {
            let row = &sizes[i * SMEM_ENTRIES..(i + 1) * SMEM_ENTRIES];
            shapes.insert(
                d,
                BlockShape {
                    read_rows: row[8] as usize,
                    states_blocks: row[9] as usize,
                    wgmma: row[10] != 0,
                    slot_rows: row[11] as usize,
                },
            );
            for (k, entry) in KERNELS {
                let name = format!("{k}_{d}");
                let bytes = entry.map_or(0, |j| row[j] as u32);
                let f = crate::device::load_with_shared_memory(&module, &name, bytes)?;
                if bytes > 0 {
                    smem.insert(name.clone(), bytes);
                }
                fns.insert(name, f);
            }
        }
        for name in SHARED_KERNELS {
            let f = crate::device::load_with_shared_memory(&module, name, 0)?;
            fns.insert(name.to_string(), f);
        }
        let side = ctx
            .new_stream()
            .map_err(|e| format!("a second stream: {e}"))?;
        Ok(ChunkedSympow {
            _module: module,
            fns,
            smem,
            shapes,
            profile: Mutex::new(None),
            side,
        })
    }

    /// Which instructions run the state products (chunk states and reads) for head dimension
    /// `d`: `"wgmma"` (Hopper) or `"mma.sync"`.
    pub fn state_products(&self, d: usize) -> &'static str {
        match self.shapes.get(&d) {
            Some(s) if s.wgmma => "wgmma",
            _ => "mma.sync",
        }
    }

    /// Starts recording per-stage times (each stage then synchronises the stream).
    pub fn start_profile(&self) {
        *self.profile.lock().unwrap() = Some(Vec::new());
    }

    /// Stops recording and returns (stage, milliseconds) in launch order.
    pub fn take_profile(&self) -> Vec<(&'static str, f64)> {
        let mut v = self.profile.lock().unwrap().take().unwrap_or_default();
        v.retain(|(name, _)| !name.is_empty());
        v
    }

    /// Whether stages are being timed (then every launch stays on the caller's stream).
    fn profiling(&self) -> bool {
        self.profile.lock().unwrap().is_some()
    }

    /// Records the stage that ran since `t0` when profiling; returns the new start time.
    fn mark(&self, stream: &Arc<CudaStream>, stage: &'static str, t0: Instant) -> Instant {
        let mut p = self.profile.lock().unwrap();
        if let Some(v) = p.as_mut() {
            stream.synchronize().expect("synchronize");
            v.push((stage, t0.elapsed().as_secs_f64() * 1e3));
            return Instant::now();
        }
        t0
    }

    /// Whether the fused kernels take this problem: p = 2 and dk = dv ∈ {32, 64, 128}.
    pub fn supports(spec: &AttentionSpec, s: &Shape) -> bool {
        spec.kernel == Kernel::Power(2) && s.dk == s.dv && HEAD_DIMS.contains(&s.dk)
    }

    /// Elements of one call's chunk states (all heads and chunks; each chunk's slot its state,
    /// then its Gram matrix).
    fn state_len(&self, g: &Geo) -> usize {
        g.bh * g.nc * self.shapes[&g.d].slot_rows * g.e
    }

    fn f(&self, name: &str, d: usize) -> &CudaFunction {
        &self.fns[&format!("{name}_{d}")]
    }

    /// Launch configuration of kernel `name` for head dimension `d`: its table shared memory.
    fn cfg(&self, name: &str, d: usize, grid: (usize, usize, usize)) -> LaunchConfig {
        cfg(grid, self.smem[&format!("{name}_{d}")])
    }

    fn stage(
        &self,
        stream: &Arc<CudaStream>,
        g: &Geo,
        spec: &AttentionSpec,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        log_gates: Option<&CudaSlice<f32>>,
    ) -> Staged {
        let n = g.bh * g.t;
        // sp_prep writes every element of each
        let alloc16 = |len: usize| alloc_output::<u16>(stream, len);
        let alloc32 = |len: usize| alloc_output::<f32>(stream, len);
        let mut st = Staged {
            qs: alloc16(n * g.d),
            kr: alloc16(n * g.d),
            qt: alloc16(n * g.d),
            kt: alloc16(n * g.d),
            vp: alloc16(n * g.e),
            g: alloc32(n),
            gam: alloc32(g.bh * g.nc),
        };
        let (t, h, l, scale) = (g.t as i32, g.h as i32, g.l as i32, spec.scale as f32);
        let f = self.f("sp_prep", g.d);
        let mut b = stream.launch_builder(f);
        b.arg(&mut st.qs)
            .arg(&mut st.kr)
            .arg(&mut st.qt)
            .arg(&mut st.kt)
            .arg(&mut st.vp)
            .arg(&mut st.g)
            .arg(&mut st.gam)
            .arg(q)
            .arg(k)
            .arg(v);
        match log_gates {
            Some(x) => b.arg(x),
            None => b.arg(&NULL),
        };
        b.arg(&t).arg(&h).arg(&l).arg(&scale);
        // parts of a chunk, a block each: enough blocks to fill the GPU, ≥ 64 tokens a part
        let parts = 1024usize.div_ceil(g.bh * g.nc).clamp(1, (g.l / 64).max(1));
        // SAFETY: arguments match sp_prep's declaration; buffers hold [BH][T][·] elements; the
        // chunk's G takes L·4 bytes of shared memory.
        unsafe { b.launch(cfg((g.bh, g.nc, parts), (g.l * 4) as u32)) }.expect("sp_prep");
        st
    }

    /// Discounted cumulative chunk states of φ(x)ᵀy with the Gram matrices xᵀ·diag(w)·x beside
    /// them (w: 1 where None), in forward order, or their gradients (reverse order).
    #[allow(clippy::too_many_arguments)]
    fn states(
        &self,
        stream: &Arc<CudaStream>,
        g: &Geo,
        x: &CudaSlice<u16>,
        y: &CudaSlice<u16>,
        w: Option<&CudaSlice<f32>>,
        gam: &CudaSlice<f32>,
        reverse: bool,
    ) -> CudaSlice<u16> {
        // sp_chunk_states and sp_chunk_gram write every element the cumsum reads; it writes all
        let mut out = alloc_output::<u16>(stream, self.state_len(g));
        let (t, l, nc, rev) = (g.t as i32, g.l as i32, g.nc as i32, i32::from(reverse));
        let shape = self.shapes[&g.d];
        {
            // the last chunk in the cumsum's order enters no state: not computed
            let skip = if reverse { 0 } else { nc - 1 };
            let mut b = stream.launch_builder(self.f("sp_chunk_states", g.d));
            b.arg(&mut out).arg(x).arg(y).arg(&t).arg(&l).arg(&skip);
            // SAFETY: as declared in sp_chunk_states; grid (blocks a chunk per the kernel's
            // table, bh, chunks); it writes the state part of every slot but the skipped
            // one's (sp_chunk_gram the Gram part, the cumsum the skipped slot).
            let grid = (shape.states_blocks, g.bh, g.nc);
            unsafe { b.launch(self.cfg("sp_chunk_states", g.d, grid)) }.expect("sp_chunk_states");
            let mut b = stream.launch_builder(self.f("sp_chunk_gram", g.d));
            b.arg(&mut out).arg(x);
            match w {
                Some(w) => b.arg(w),
                None => b.arg(&NULL),
            };
            b.arg(&t).arg(&l).arg(&skip);
            // SAFETY: as declared in sp_chunk_gram; a block per (bh, chunk), its shared memory
            // static; it writes the Gram part of every slot but the skipped one's.
            unsafe { b.launch(cfg((1, g.bh, g.nc), 0)) }.expect("sp_chunk_gram");
        }
        let per_chunk = (shape.slot_rows * g.e) as i64;
        let slices = (per_chunk as usize / DISC_VEC).div_ceil(THREADS as usize);
        let mut b = stream.launch_builder(&self.fns["sp_discumsum_all"]);
        b.arg(&mut out).arg(gam).arg(&per_chunk).arg(&nc).arg(&rev);
        // SAFETY: as declared in sp_discumsum_all; each thread owns DISC_VEC elements of
        // every chunk's slot, bounded by per_chunk.
        unsafe { b.launch(cfg((g.bh, slices, 1), 0)) }.expect("sp_discumsum_all");
        out
    }

    /// [`GatherMaps`] over the states `s` (zeros, unused, where the states are full: `mma.sync`).
    fn gather_maps(&self, on: &CudaStream, g: &Geo, s: &CudaSlice<u16>) -> GatherMaps {
        let mut maps = GatherMaps([CUtensorMap { opaque: [0; 16] }; GATHER_MAPS]);
        if !self.shapes[&g.d].wgmma {
            return maps;
        }
        let (ptr, _sync) = s.device_ptr(on);
        let (d, e) = (g.d as u64, g.e as u64);
        let groups = (self.state_len(g) / g.e / 8) as u64;
        for (ta, map) in maps.0.iter_mut().enumerate().take(g.d / 16 - 1) {
            let run = (d - 16 * ta as u64) * e * 2; // bytes from row (a, b) to (a + 1, b)
            let dims = [64, 8, e / 8, 2, groups];
            let strides = [run, 128, 8 * run, 16 * e];
            let boxes = [8, 8, (e / 8) as u32, 2, 1];
            // SAFETY: the arrays hold the rank's 5 (strides 4) entries; the address is the
            // states' device allocation, which outlives the launch that reads through the map.
            unsafe {
                sys::cuTensorMapEncodeTiled(
                    map,
                    sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                    5,
                    ptr as *mut std::ffi::c_void,
                    dims.as_ptr(),
                    strides.as_ptr(),
                    boxes.as_ptr(),
                    [1u32; 5].as_ptr(),
                    sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                    sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
                    sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_NONE,
                    sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
                )
            }
            .result()
            .expect("cuTensorMapEncodeTiled (the ∂x read's gather)");
        }
        maps
    }

    /// `r = Σ_a x_a (X S[a])` and/or `dx = 2·rowdot(X S[a], W)` per chunk (at least one), the
    /// states `s` made in the cumsum's forward order (`reverse` false: chunk 0's is zero) or
    /// reverse order (the last chunk's is zero). On `wgmma` both are two passes, r's and dx's
    /// (each streams S once more, by bulk copies); elsewhere one `mma.sync` pass can form both.
    /// Into `r` ([BH][T][E]) and `dx` ([BH][T][D], given with `w`: every token's row of each is
    /// written once, by the block that owns it), launched on `on`.
    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        on: &CudaStream,
        g: &Geo,
        mut r: Option<&mut CudaSlice<f32>>,
        mut dx: Option<&mut CudaSlice<f32>>,
        x: &CudaSlice<u16>,
        s: &CudaSlice<u16>,
        reverse: bool,
        w: Option<&CudaSlice<u16>>,
    ) {
        assert_eq!(dx.is_some(), w.is_some(), "dx is read with w");
        let passes: &[&str] = match (r.is_some(), w.is_some()) {
            (true, false) => &["sp_read_r"],
            (false, true) => &["sp_read_dx"],
            (true, true) if self.shapes[&g.d].wgmma => &["sp_read_r", "sp_read_dx"],
            (true, true) => &["sp_read_rdx"],
            (false, false) => unreachable!("read wants r, dx or both"),
        };
        let (t, l, nc) = (g.t as i32, g.l as i32, g.nc as i32);
        // the chunk whose state is zero: its blocks write zeros and read nothing
        let zero = if reverse { nc - 1 } else { 0 };
        let maps = w.map(|_| self.gather_maps(on, g, s));
        for &name in passes {
            let mut b = on.launch_builder(self.f(name, g.d));
            match r.as_deref_mut().filter(|_| name != "sp_read_dx") {
                Some(x) => b.arg(x),
                None => b.arg(&NULL),
            };
            match dx.as_deref_mut().filter(|_| name != "sp_read_r") {
                Some(x) => b.arg(x),
                None => b.arg(&NULL),
            };
            b.arg(x).arg(s);
            match w {
                Some(x) => b.arg(x),
                None => b.arg(&NULL),
            };
            b.arg(&t).arg(&l).arg(&nc).arg(&zero);
            if let (Some(maps), "sp_read_dx") = (&maps, name) {
                b.arg(maps);
            }
            // SAFETY: as declared in sp_read; one block per read_rows tokens of a chunk; r and
            // dx hold [BH][T][E] and [BH][T][D] elements; the maps view `s`.
            let tiles = g.l.div_ceil(self.shapes[&g.d].read_rows);
            unsafe { b.launch(self.cfg(name, g.d, (tiles, g.bh, g.nc))) }.expect(name);
        }
    }

    /// Forward: y `[B, T, H, D]` and log-normalisers `[B, T, H]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        stream: &Arc<CudaStream>,
        spec: &AttentionSpec,
        shape: &Shape,
        chunk: usize,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        log_gates: Option<&CudaSlice<f32>>,
    ) -> AttentionOut<CudaSlice<f32>> {
        let g = Geo::new(shape, chunk);
        let t0 = self.mark(stream, "", Instant::now());
        let st = self.stage(stream, &g, spec, q, k, v, log_gates);
        let t0 = self.mark(stream, "fwd prep", t0);
        let states = self.states(stream, &g, &st.kt, &st.vp, None, &st.gam, false);
        let t0 = self.mark(stream, "fwd states", t0);
        let rows = g.bh * g.t;
        let mut inter = alloc_output::<f32>(stream, rows * g.e);
        self.read(
            stream,
            &g,
            Some(&mut inter),
            None,
            &st.qt,
            &states,
            false,
            None,
        );
        let t0 = self.mark(stream, "fwd read (inter)", t0);
        let mut y = alloc_output::<f32>(stream, rows * g.d);
        let mut ln = alloc_output::<f32>(stream, rows);
        let (t, h, l, eps) = (g.t as i32, g.h as i32, g.l as i32, spec.eps as f32);
        let f = self.f("sp_intra_fwd", g.d);
        let mut b = stream.launch_builder(f);
        b.arg(&mut y)
            .arg(&mut ln)
            .arg(&st.qs)
            .arg(&st.kr)
            .arg(&st.vp)
            .arg(&st.g)
            .arg(&inter)
            .arg(&states)
            .arg(&t)
            .arg(&h)
            .arg(&l)
            .arg(&eps);
        // SAFETY: as declared in sp_intra_fwd; one block per 128 queries of a chunk.
        unsafe { b.launch(self.cfg("sp_intra_fwd", g.d, (g.tiles(), g.bh, g.nc))) }
            .expect("sp_intra_fwd");
        self.mark(stream, "fwd intra + combine", t0);
        AttentionOut {
            y,
            log_norm: ln,
            saved: Some(Arc::new(FusedSaved {
                staged: st,
                states,
                l: g.l,
            })),
        }
    }

    /// Backward: gradients of q, k, v and (when given) the log-gates.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        stream: &Arc<CudaStream>,
        spec: &AttentionSpec,
        shape: &Shape,
        chunk: usize,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        log_gates: Option<&CudaSlice<f32>>,
        out: &AttentionOut<CudaSlice<f32>>,
        dy: &CudaSlice<f32>,
    ) -> AttentionGrads<CudaSlice<f32>> {
        let g = Geo::new(shape, chunk);
        let n = g.bh * g.t;
        let t0 = self.mark(stream, "", Instant::now());
        // the forward's operands and states, or (given an output from elsewhere) recomputed
        let saved = out
            .saved
            .as_ref()
            .and_then(|s| s.downcast_ref::<FusedSaved>())
            .filter(|s| s.l == g.l && s.states.len() == self.state_len(&g));
        let recomputed;
        let (st, s_fwd) = match saved {
            Some(s) => (&s.staged, &s.states),
            None => {
                let st = self.stage(stream, &g, spec, q, k, v, log_gates);
                let states = self.states(stream, &g, &st.kt, &st.vp, None, &st.gam, false);
                recomputed = (st, states);
                (&recomputed.0, &recomputed.1)
            }
        };
        let t0 = self.mark(stream, "bwd prep (none if saved)", t0);
        let (bi, t, h, l) = (shape.batch as i32, g.t as i32, g.h as i32, g.l as i32);

        // ∂(numerator, denominator)
        let mut dn = alloc_output::<u16>(stream, n * g.e);
        let mut dz = alloc_output::<f32>(stream, n);
        {
            let mut b = stream.launch_builder(self.f("sp_bwd_prep", g.d));
            b.arg(&mut dn)
                .arg(&mut dz)
                .arg(dy)
                .arg(&out.y)
                .arg(&out.log_norm);
            b.arg(&bi).arg(&t).arg(&h);
            // SAFETY: as declared in sp_bwd_prep; one warp per token.
            unsafe { b.launch(cfg((n.div_ceil(8), 1, 1), 0)) }.expect("sp_bwd_prep");
        }
        let t0 = self.mark(stream, "bwd output grads", t0);

        // Two independent halves, each an inter-chunk read and then the intra-chunk kernel that
        // ends in the chain rule back to the model's tensors for its tokens: the ∂q half (∂q̃
        // through the forward's states, then ∂q and the queries' part of the gates' gradient),
        // and the ∂k∂v half (the state gradients, summed in reverse, their read, then ∂k, ∂v and
        // the keys' part). The ∂q half runs on a second stream, so that the reverse cumsum (bound
        // by memory) shares the GPU with the ∂q read (bound by its products). Every buffer is
        // allocated, and so freed, on `stream`; the second stream's work sits between a join of
        // `stream` (after the allocations) and a join back. Profiling runs both halves on
        // `stream`, one stage after another.
        let side = if self.profiling() { stream } else { &self.side };
        let out32 = |len: usize| alloc_output::<f32>(stream, len);
        let (mut dq, mut dk, mut dv) = (out32(n * g.d), out32(n * g.d), out32(n * g.d));
        // with gates, per token: ∂G_τ's query and key parts
        let mut dgt = log_gates.map(|_| (out32(n), out32(n)));
        let mut dqt = out32(n * g.d);
        let scale = spec.scale as f32;
        side.join(stream).expect("stream join");

        let r_bwd = self.states(stream, &g, &st.qt, &dn, Some(&dz), &st.gam, true);
        let t0 = self.mark(stream, "bwd state grads (reverse)", t0);
        self.read(
            side,
            &g,
            None,
            Some(&mut dqt),
            &st.qt,
            s_fwd,
            false,
            Some(&dn),
        );
        let t0 = self.mark(stream, "bwd read dq", t0);
        let (mut dvp, mut dkt) = (out32(n * g.e), out32(n * g.d));
        self.read(
            stream,
            &g,
            Some(&mut dvp),
            Some(&mut dkt),
            &st.kt,
            &r_bwd,
            true,
            Some(&st.vp),
        );
        let t0 = self.mark(stream, "bwd read dk dv", t0);
        {
            let mut b = stream.launch_builder(self.f("sp_intra_bwd_dkv", g.d));
            b.arg(&mut dk).arg(&mut dv);
            match dgt.as_mut() {
                Some((_, dgk)) => b.arg(dgk),
                None => b.arg(&NULL),
            };
            b.arg(&st.qs)
                .arg(&st.kr)
                .arg(&st.vp)
                .arg(&dn)
                .arg(&dz)
                .arg(&st.g);
            b.arg(&st.gam).arg(k).arg(&dkt).arg(&dvp).arg(&r_bwd);
            b.arg(&t).arg(&h).arg(&l);
            // SAFETY: as declared in sp_intra_bwd_dkv; one block per 128 keys of a chunk.
            unsafe { b.launch(self.cfg("sp_intra_bwd_dkv", g.d, (g.tiles(), g.bh, g.nc))) }
                .expect("sp_intra_bwd_dkv");
        }
        let t0 = self.mark(stream, "bwd intra dk dv", t0);
        {
            let mut b = side.launch_builder(self.f("sp_intra_bwd_dq", g.d));
            b.arg(&mut dq);
            match dgt.as_mut() {
                Some((dgq, _)) => b.arg(dgq),
                None => b.arg(&NULL),
            };
            b.arg(&st.qs)
                .arg(&st.kr)
                .arg(&st.vp)
                .arg(&dn)
                .arg(&dz)
                .arg(&st.g);
            b.arg(q).arg(&dqt).arg(s_fwd);
            b.arg(&t).arg(&h).arg(&l).arg(&scale);
            // SAFETY: as declared in sp_intra_bwd_dq; one block per 128 queries of a chunk.
            unsafe { b.launch(self.cfg("sp_intra_bwd_dq", g.d, (g.tiles(), g.bh, g.nc))) }
                .expect("sp_intra_bwd_dq");
        }
        let t0 = self.mark(stream, "bwd intra dq", t0);
        stream.join(side).expect("stream join");
        // (freed on `stream`, after the join: nothing on `side` still uses them)
        drop((r_bwd, dqt, dkt, dvp, dn, dz));

        // with gates, ∂g_r = Σ_{τ ≥ r} ∂G_τ over the sequence: the chunks' sums, then the suffixes
        let mut dg = log_gates.map(|_| out32(n));
        if let (Some(dg), Some((dgq, dgk))) = (dg.as_mut(), dgt.as_ref()) {
            // one warp per (bh, chunk) in both
            let per_chunk = LaunchConfig {
                block_dim: (32, 1, 1),
                ..cfg((g.bh, g.nc, 1), 0)
            };
            let mut sums = out32(g.bh * g.nc);
            let mut b = stream.launch_builder(&self.fns["sp_gate_chunk_sums"]);
            b.arg(&mut sums).arg(dgq).arg(dgk).arg(&t).arg(&l);
            // SAFETY: as declared in sp_gate_chunk_sums; it writes sums[bh·nc + chunk].
            unsafe { b.launch(per_chunk) }.expect("sp_gate_chunk_sums");
            let mut b = stream.launch_builder(&self.fns["sp_bwd_gates"]);
            b.arg(dg).arg(dgq).arg(dgk).arg(&sums);
            b.arg(&t).arg(&h).arg(&l);
            // SAFETY: as declared in sp_bwd_gates.
            unsafe { b.launch(per_chunk) }.expect("sp_bwd_gates");
        }
        self.mark(stream, "bwd gates (none if ungated)", t0);
        AttentionGrads {
            dq,
            dk,
            dv,
            dlog_gates: dg,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_source_variant_replaces_only_the_kernels_file() {
        assert_eq!(kernel_source_from(None).unwrap(), SOURCE);
        let dir = std::env::temp_dir().join(format!("sympow-variant-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("variant.cu");
        std::fs::write(&file, "// a variant\n").unwrap();
        let src = kernel_source_from(Some(file.as_os_str())).unwrap();
        assert!(src.ends_with("// a variant\n"));
        assert!(src.starts_with(include_str!("../kernels/reduce.cuh")));
        assert!(src.contains(include_str!("../kernels/mma.cuh")));
        assert!(src.contains(include_str!("../kernels/wgmma.cuh")));
        assert!(
            !src.contains("sp_smem_sizes"),
            "the built-in kernels are gone"
        );
        let err = kernel_source_from(Some(dir.join("missing.cu").as_os_str())).unwrap_err();
        assert!(
            err.starts_with("SYMPOW_CHUNKED_CU=") && err.contains("missing.cu"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The value of `#define name value` in the kernel source.
    fn define(name: &str) -> usize {
        let key = format!("#define {name} ");
        let line = SOURCE
            .lines()
            .find(|l| l.starts_with(&key))
            .unwrap_or_else(|| panic!("no {key} in the kernel source"));
        line[key.len()..].trim().parse().expect("a number")
    }

    /// The host's copies of the kernel source's constants (a launch shaped by a stale one reads
    /// past a buffer on the GPU; here it fails on any machine).
    #[test]
    fn host_constants_match_the_kernel_source() {
        assert_eq!(SMEM_ENTRIES, define("SMEM_ENTRIES"));
        assert_eq!(DISC_VEC, define("DISC_VEC"));
        assert_eq!(GATHER_MAPS, define("GATHER_MAPS"));
        assert_eq!(std::mem::size_of::<GatherMaps>(), GATHER_MAPS * 128);
        assert_eq!(THREADS as usize, define("THREADS"));
        for d in HEAD_DIMS {
            assert!(
                SOURCE.contains(&format!("SP_INSTANCES({d})")),
                "head dimension {d} is not instantiated"
            );
        }
        for (name, _) in KERNELS {
            assert!(
                SOURCE.contains(&format!("{name}_##D(")),
                "kernel {name} is not declared"
            );
        }
        for name in SHARED_KERNELS {
            // `{name}(` right after an `extern "C" __global__` (its launch bounds may sit between)
            let declared = SOURCE.match_indices(&format!("{name}(")).any(|(i, _)| {
                SOURCE[..i]
                    .rsplit_once("extern \"C\" __global__")
                    .is_some_and(|(_, between)| !between.contains([';', '{', '}']))
            });
            assert!(declared, "kernel {name} is not declared");
        }
    }
}
