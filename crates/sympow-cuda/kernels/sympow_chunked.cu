// Chunked symmetric-power attention, p = 2, on tensor cores: the GPU twin of
// crates/sympow/src/attention/chunked.rs (SPEC §4), for head dimension D = dk = dv ∈ {32, 64, 128}.
//
// Every matrix product is an mma.sync m16n8k16 (bf16 operands, f32 accumulation) on fragments
// loaded from shared memory by ldmatrix — except, on Hopper (compute_90a), the state products
// of sp_chunk_states and the r-only and dx-only reads, which have wgmma forms (further down).
// The degree-2 feature map is never materialised: φ(x) = x ⊗ x, so a
// product with φ(X) is a loop over the first factor's index a of products with diag(x_a)·X —
// the scaling folded into an operand fragment (states) or into the accumulator (reads).
// The state S[a][b] is symmetric in its index pair. Where the wgmma kernels run it is
// tile-packed — only the pairs whose 16-wide tiles have tile(a) ≤ tile(b), rows [a][b][j] (see
// packed_before), stored in core-matrix order (core_row): the reads take each slice's own rows
// as they are stored (slice a: b ≥ 16·tile(a)), the dx read the rest of its slice from the
// earlier slices' rows.
// Elsewhere it is kept for the full D×D pair, [a][j][b] (the mma.sync reads measured faster on
// that layout: ∂q's 1.11 against 1.48 ms at T = 4k).
//
// Pipeline (one launch each; [BH] = batch·heads, [T] tokens, chunks of L tokens, NC chunks):
//   sp_prep     g → local cumulative gates G and chunk totals Γ; bf16 staging copies
//               qs = σq, kr = k, q̃ = σ e^{G/2} q, k̃ = e^{(Γ−G)/2} k, v
//   sp_chunk_states, sp_chunk_gram  per chunk (in parallel), the numerator's ΔS_i = φ(K̃_i)ᵀV_i
//               and the denominator's ΔZ_i = K̃_iᵀK̃_i (backward: φ(Q̃_i)ᵀ∂N_i and Q̃_iᵀ diag(∂Z) Q̃_i)
//   sp_discumsum     in place, the discounted cumulative sums S_i = Σ_{j<i} e^{Γ_{j+1}+…} ΔS_j
//               (forward), or in reverse order R_i = ∂L/∂ΔS_i (backward); Z with S
//   sp_read_{r,dx,rdx}  Σ_a x_a (X S[a]) (the inter-chunk numerator, or ∂v),
//               2·rowdot(X S[a], W) (∂x; dx[t, a] = 2 Σ_{b,j} x_tb w_tj S[a][b][j]), or both
//   sp_intra_fwd  causal (σq·k)² e^{G_t−G_s} inside the chunk, plus the combine
//               y = (inter + intra)_num / (inter + intra)_den + ε), the inter-chunk denominator
//               q̃ᵀZq̃ formed here
//   sp_bwd_prep, sp_intra_bwd_dkv, sp_intra_bwd_dq (each with the chain rule back to the model's
//               tensors for its tokens, and the denominator's part of ∂q̃ or ∂k̃: 2∂Z·Zq̃, 2R_Z·k̃),
//               sp_bwd_gates: the backward pass.
// The denominator φ(q̃)·Σφ(k̃) = q̃ᵀ(Σ k̃k̃ᵀ)q̃ is kept apart from the numerator's state: as a
// column of ones in v it padded the state's columns from D to D + 16 (the reads' k-steps are 16
// wide), a fifth more bytes and products in every state stage.
// Layout of the model's tensors: q, k, v, y, dy [B, T, H, D]; g, log_norm [B, T, H].

#define THREADS 256
#define WARPS 8
// The wgmma forms of the state products need sm_90a (NVRTC's compute_90a defines this macro).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SP_WGMMA 1
#else
#define SP_WGMMA 0
#endif
#define FULL 0xffffffffu

template <int D> struct Dims {
    static constexpr int E = D;  // the state's columns: v's (the denominator is kept apart)
    static constexpr int NT = E / 8;                     // accumulator tiles across E
    // sp_chunk_states: each warp owns one 16-row tile of b for U consecutive values of the first
    // feature index a; a block owns A values of a (WARPS / (D/16) groups of U).
    static constexpr int U = D >= 128 ? 2 : 4;
    static constexpr int A = WARPS / (D / 16) * U;
    static constexpr int TT = 64;  // tokens per staged tile
    // intra backward: queries per tile of the key-side kernel (32: with it the kernel fits two
    // blocks an SM at D ≤ 64, see its entry point; 64 measured slower at one block)
    static constexpr int QB = 32;
    // sp_read: 16-row blocks per warp (each B fragment of the state feeds RM of them)
    static constexpr int RM = D >= 128 ? 1 : 2;
};

template <int D> struct Wg;

// Tile-packed states (where the state products run on wgmma): the state is symmetric in its
// index pair, S[a][b] = S[b][a], so only the pairs whose 16-wide index tiles have tile(a) ≤
// tile(b) are kept — for each a the rows b = 16·tile(a) … D−1, E wide, a after a (D = 64:
// 2,560 of 4,096 rows; 128: 9,216 of 16,384). A row in an off-diagonal tile stands for two
// entries of the full state, one in a diagonal tile for one.
__host__ __device__ constexpr int packed_before(int D, int a) {  // rows of all a' < a
    return 16 * ((a / 16) * D - 8 * (a / 16) * (a / 16 - 1)) + (a % 16) * (D - (a & ~15));
}
__device__ __forceinline__ int packed_row(int D, int a, int b) {  // tile(a) ≤ tile(b)
    return packed_before(D, a) + b - (a & ~15);
}
// A chunk's slot in a states tensor ([BH][NC] slots): the numerator's state — E-wide rows,
// tile-packed where the wgmma kernels run, D·D ([a][j][b]) elsewhere — then the denominator's
// D × D state Z (both triangles, row-major) as D more rows; one cumsum runs over both.
template <int D> struct Slot {
#if SP_WGMMA
    static constexpr int state_rows = packed_before(D, D);
#else
    static constexpr int state_rows = D * D;
#endif
    static constexpr int rows = state_rows + D;
    static constexpr long elems = (long)rows * Dims<D>::E;
    static constexpr long z = (long)state_rows * Dims<D>::E;  // Z's offset in the slot
};
// The tile-packed state is stored in core-matrix order: its rows in groups of 8, a group as E/8
// pieces of 8 rows × 8 columns (128 bytes: the unit in which wgmma reads B from shared memory),
// the order the reads' shared-memory stages use — so a run of whole groups (a slice of the r
// read) lands in its stage as one bulk copy. Row r's piece c (columns 8c … 8c + 7) is at
// core_row(E, r) + CORE_PIECE·c.
#define CORE_PIECE 64
__device__ __forceinline__ long core_row(int E, int r) { return (long)(r >> 3) * 8 * E + (r & 7) * 8; }
// The ∂x reads' gathered rows (sp_read_wg), by the TMA engine: rows a < 16·tile(b) of slice b,
// S[a][b] in a's packed rows, lie equally spaced for each tile TA of a ((D − 16·TA)·E elements
// apart), so map TA (chunked.rs, gather_maps) describes them as a 5-D tensor whose box lands in
// shared memory in core-matrix order: [2 groups of 8 a][E/8 pieces][8 a][row b's 8 columns].
// Opaque tensor maps made by the host, passed by value (__grid_constant__).
struct __align__(64) TensorMap {
    unsigned long long opaque[16];
};
// tiles of a before the last, at D = 128
#define GATHER_MAPS 7
struct GatherMaps {
    TensorMap tile[GATHER_MAPS];
};
#if SP_WGMMA
// Bulk copies (Hopper's TMA engine, one instruction for a contiguous run of bytes, multiples of
// 16) completing on an mbarrier in shared memory: the issuing thread arms the barrier with the
// bytes to come (expect_tx), the copy's completion counts them off, and the barrier's phase
// completes when both have happened; waiters spin on the phase's parity.
__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(unsigned long long* b, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(b)), "r"(count));
}
__device__ __forceinline__ void mbar_wait(unsigned long long* b, u32 parity) {
    asm volatile(
        "{\n.reg .pred p;\nWAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAIT_%=;\n}" ::"r"(smem_addr(b)),
        "r"(parity)
        : "memory");
}
// More bytes for the barrier's current phase, without an arrival (tensor copies beside a bulk copy).
__device__ __forceinline__ void mbar_expect_tx(unsigned long long* b, u32 bytes) {
    asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(b)), "r"(bytes) : "memory");
}
// One box of a 5-D tensor map into shared memory, completing on the barrier.
__device__ __forceinline__ void tensor_copy_5d(void* dst, const TensorMap* map, int c0, int c1, int c2, int c3, int c4,
                                               unsigned long long* bar) {
    asm volatile(
        "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5, "
        "%6}], [%7];" ::"r"(smem_addr(dst)),
        "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(smem_addr(bar))
        : "memory");
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, u32 bytes, unsigned long long* bar) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}" ::"r"(smem_addr(bar)),
                 "r"(bytes)
                 : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     smem_addr(dst)),
                 "l"(src), "r"(bytes), "r"(smem_addr(bar))
                 : "memory");
}
#endif

// Shared-memory bytes each kernel needs (one source of truth: the host asks sp_smem_sizes), and
// what the host's grids and buffers depend on: tokens per sp_read block, sp_chunk_states blocks
// per chunk, rows of a chunk's state.
template <int D> struct Smem {
    typedef Dims<D> Dm;
    static constexpr int E = Dm::E;
    static constexpr int prep = 0;  // sized by the host from the chunk length L: L·4 bytes
    // sp_read (mma.sync): tokens per block; r, dx, both
    static constexpr int read_qt = 16 * Dm::RM * WARPS;
    static constexpr int read_r = (2 * E * (D + 8) + read_qt * (D + 8)) * 2;
    static constexpr int read_dx = read_r + read_qt * (E + 8) * 2 + read_qt * 9 * 4;
    static constexpr int read_rdx = read_dx;
#if SP_WGMMA
    typedef Wg<D> W;
    static_assert(W::QT == read_qt, "the host sizes every read grid alike");
    static constexpr int states = W::ST * W::TT * ((D + 8) + E) * 2;
    static constexpr int wg_read_r = (W::RST * D * E + read_qt * (D + 8)) * 2;
    static constexpr int wg_read_dx = wg_read_r + read_qt * (E + 8) * 2;
    static constexpr int states_blocks = W::BLOCKS;
#else
    static constexpr int states = 2 * Dm::TT * ((D + 8) + (E + 8)) * 2;
    static constexpr int wg_read_r = read_r, wg_read_dx = read_dx;
    static constexpr int states_blocks = D / Dm::A;
#endif
    static constexpr int slot_rows = Slot<D>::rows;
    // intra kernels: a fixed 128-row tile, two stages of the streamed tiles, the chunk's Z (or
    // R_Z), then the streamed tiles' G (and, but for dq, each warp's decay factors of a tile; for
    // dkv, the queries' ∂Z)
    static constexpr int zs = D * (D + 8) * 2;
    static constexpr int intra_fwd =
        (128 * (D + 8) + 2 * 64 * (D + 8) + 2 * 64 * (E + 8)) * 2 + zs + (2 + WARPS) * 64 * 4;
    static constexpr int dkv = (128 * (D + 8) + 128 * (E + 8) + 2 * Dm::QB * (D + 8) + 2 * Dm::QB * (E + 8)) * 2 + zs +
                               (4 + WARPS) * Dm::QB * 4;
    static constexpr int dq =
        (128 * (D + 8) + 128 * (E + 8) + 2 * 64 * (D + 8) + 2 * 64 * (E + 8)) * 2 + zs + (2 + WARPS) * 64 * 4;
};

// 128: the TMA engine's tensor copies (the ∂x read's gather) write at 128-byte-aligned addresses
extern __shared__ __align__(128) unsigned char smem[];

// ---------------------------------------------------------------------------------------------
// Block (bh, chunk, part): a chunk's tokens are split over gridDim.z blocks (one block a chunk
// left most of the GPU idle: gpt2-124m at 16k is 12 heads × 16 chunks). Each block scans the
// whole chunk's log-gates (the same order in every part: G and Γ agree bit for bit) and stages
// its part's tokens, two columns a thread.
template <int D>
__device__ void sp_prep(bf16* qs, bf16* kr, bf16* qt, bf16* kt, bf16* vp, float* Gout, float* Gam, const float* q,
                        const float* k, const float* v, const float* g, int T, int H, int L, float scale) {
    constexpr int D2 = D / 2;
    int bh = blockIdx.x, ci = blockIdx.y, NC = gridDim.y;
    int b = bh / H, h = bh % H;
    int t0 = ci * L, n = min(L, T - t0);
    int per_part = (n + gridDim.z - 1) / gridDim.z;
    int p0 = min((int)blockIdx.z * per_part, n), p1 = min(p0 + per_part, n), m = p1 - p0;
    float* Gs = (float*)smem;
    __shared__ float total;
    if (threadIdx.x < 32) {  // inclusive cumulative sum of the chunk's log-gates, in double
        int lane = threadIdx.x, per = (n + 31) / 32, s0 = min(lane * per, n), s1 = min(s0 + per, n);
        double acc = 0.0;
        if (g)
            for (int s = s0; s < s1; s++) acc += g[(long)(b * T + t0 + s) * H + h];
        double pre = acc;
        for (int o = 1; o < 32; o <<= 1) {
            double y = __shfl_up_sync(FULL, pre, o);
            if (lane >= o) pre += y;
        }
        double run = pre - acc;
        for (int s = s0; s < s1; s++) {
            if (g) run += g[(long)(b * T + t0 + s) * H + h];
            Gs[s] = (float)run;
        }
        if (lane == 31) total = (float)pre;
    }
    __syncthreads();
    float Gm = total;
    if (threadIdx.x == 0 && blockIdx.z == 0) Gam[bh * NC + ci] = Gm;
    // PU elements a thread per step, every load of a step issued before its stores (the compiler
    // keeps a load behind any earlier store that might alias it, so a load-compute-store loop
    // pays a memory round trip per element)
    constexpr int PU = 4;
    for (int i0 = threadIdx.x; i0 < m * D2; i0 += PU * blockDim.x) {
        float2 qv[PU], kv[PU], vv[PU];
#pragma unroll
        for (int u = 0; u < PU; u++) {
            int i = min(i0 + u * (int)blockDim.x, m * D2 - 1), s = p0 + i / D2, j = 2 * (i % D2);
            long src = ((long)(b * T + t0 + s) * H + h) * D + j;
            qv[u] = *(const float2*)(q + src);
            kv[u] = *(const float2*)(k + src);
            vv[u] = *(const float2*)(v + src);
        }
#pragma unroll
        for (int u = 0; u < PU; u++) {
            int i = i0 + u * blockDim.x, s = p0 + i / D2, j = 2 * (i % D2);
            if (i >= m * D2) break;
            long dst = ((long)bh * T + t0 + s) * D + j;
            float2 qx = make_float2(qv[u].x * scale, qv[u].y * scale);
            float G = Gs[s], eq = expf(0.5f * G), ek = expf(0.5f * (Gm - G));
            *(u32*)(qs + dst) = pack2(qx.x, qx.y);
            *(u32*)(kr + dst) = pack2(kv[u].x, kv[u].y);
            *(u32*)(qt + dst) = pack2(qx.x * eq, qx.y * eq);
            *(u32*)(kt + dst) = pack2(kv[u].x * ek, kv[u].y * ek);
            *(u32*)(vp + dst) = pack2(vv[u].x, vv[u].y);
        }
    }
    for (int s = p0 + threadIdx.x; s < p1; s += blockDim.x) Gout[(long)bh * T + t0 + s] = Gs[s];
}

// ---------------------------------------------------------------------------------------------
// One chunk's contribution to the state, out[bh][i][a][j][b] = Σ_τ x_τa x_τb y_τj (bf16; the
// full layout of the file's head — on Hopper sp_chunk_states_wg writes the packed one), for
// x = k̃, y = v (forward: ΔS_i) or x = q̃, y = ∂N (backward: the state gradient taken directly by
// chunk i's queries). Block (group of A first indices a, bh, chunk i) — a chunk's groups run side
// by side, so its tokens come from DRAM once. Each warp owns 16 rows of b for U consecutive a ×
// all E columns: one A fragment (x_τb) per 16 tokens, scaled by x_τa for each a (the U scalars of
// a token row are one shared-memory load), and each B fragment (y) feeds all U. Tiles of TT
// tokens, token-major in shared memory.
// A chunk whose contribution enters no state (`skip`) does nothing: the cumsum writes its slot.
template <int D>
__device__ void sp_chunk_states(bf16* out, const bf16* x, const bf16* y, int T, int L, bool skip) {
    if (skip) return;
    typedef Dims<D> Dm;
    constexpr int E = Dm::E, NT = Dm::NT, U = Dm::U, MT = D / 16, TT = Dm::TT, LDX = D + 8, LDY = E + 8;
    bf16* buf = (bf16*)smem;    // two stages of Xs [TT][LDX] then Ys [TT][LDY]
    constexpr int STAGE = TT * (LDX + LDY);
    int a0 = blockIdx.x * Dm::A, bh = blockIdx.y, ci = blockIdx.z, NC = gridDim.z;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int mt = warp % MT, ab = a0 + warp / MT * U;  // this warp's tile of b and its first a
    float acc[U][NT][4];
#pragma unroll
    for (int u = 0; u < U; u++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[u][nt][i] = 0.f;
    int t0 = ci * L, n = min(L, T - t0);
    const bf16* xh = x + ((long)bh * T + t0) * D;
    const bf16* yh = y + ((long)bh * T + t0) * E;
    auto issue = [&](int s0) {
        if (s0 < n) {
            bf16* st = buf + ((s0 / TT) & 1) * STAGE;
            int nv = min(TT, n - s0);
            load_rows_async(st, LDX, xh + (long)s0 * D, nv, TT, D);
            load_rows_async(st + TT * LDX, LDY, yh + (long)s0 * E, nv, TT, E);
        }
        cp_async_commit();
    };
    issue(0);
    for (int s0 = 0; s0 < n; s0 += TT) {
        issue(s0 + TT);
        cp_async_wait_prev();
        __syncthreads();
        const bf16* Xs = buf + ((s0 / TT) & 1) * STAGE;
        const bf16* Ys = Xs + TT * LDX;
#pragma unroll
        for (int kk = 0; kk < TT; kk += 16) {
            u32 xb[4], af[U][4];
            lda_kmajor(xb, Xs, LDX, mt * 16, kk);  // A(b, τ) = x_τb
            bf16 xs[4][U];  // x_τa at the fragment's token rows 2t, 2t+1, 2t+8, 2t+9
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const bf16* p = Xs + (kk + 2 * t + (r & 1) + (r >> 1) * 8) * LDX + ab;
                u32 w[U / 2];
                if (U == 4) {
                    uint2 v = *(const uint2*)p;
                    w[0] = v.x;
                    w[U / 2 - 1] = v.y;
                } else {
                    w[0] = *(const u32*)p;
                }
#pragma unroll
                for (int u = 0; u < U; u++) xs[r][u] = (bf16)((u & 1) ? w[u / 2] >> 16 : w[u / 2] & 0xffffu);
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                u32 s01 = bf16_pair(xs[0][u], xs[1][u]), s89 = bf16_pair(xs[2][u], xs[3][u]);
                af[u][0] = mul_bf16x2(xb[0], s01);
                af[u][1] = mul_bf16x2(xb[1], s01);
                af[u][2] = mul_bf16x2(xb[2], s89);
                af[u][3] = mul_bf16x2(xb[3], s89);
            }
#pragma unroll
            for (int nt = 0; nt < NT; nt += 2) {  // each B fragment feeds all U units
                u32 bfr[4];
                ldb2_kmajor(bfr, Ys, LDY, kk, nt * 8);
#pragma unroll
                for (int u = 0; u < U; u++) {
                    mma16816(acc[u][nt], af[u], bfr);
                    mma16816(acc[u][nt + 1], af[u], bfr + 2);
                }
            }
        }
        __syncthreads();  // this stage is refilled by the next iteration's issue
    }
#pragma unroll
    for (int u = 0; u < U; u++) {
        long base = ((long)bh * NC + ci) * Slot<D>::elems + (long)(ab + u) * D * E;
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int row = mt * 16 + g + (i >= 2 ? 8 : 0), col = nt * 8 + 2 * t + (i & 1);
                out[base + (long)col * D + row] = f2b(acc[u][nt][i]);
            }
    }
}

// One chunk's Gram matrix, the denominator's part of its slot: Z = Σ_τ w_τ x_τ x_τᵀ (D × D,
// bf16, both triangles) — forward x = k̃ and w = 1 (w null): the state of the column of ones
// that v would otherwise carry; backward x = q̃, w = ∂Z (its gradient taken directly by chunk i's
// queries). Block (bh, chunk i); warp w owns row tile w mod D/16 of a and NTW column tiles of b
// (D = 32: four warps idle); tiles of 64 tokens, token-major in shared memory (with w: a second
// copy scaled by it). ≈ 1/40 of the chunk states' products.
template <int D>
__device__ void sp_chunk_gram(bf16* out, const bf16* x, const float* w, int T, int L, bool skip) {
    constexpr int MT = D / 16, WPR = WARPS / MT < D / 16 ? WARPS / MT : D / 16, NTW = D / WPR / 8, TT = 64,
                  LDX = D + 8;
    __shared__ __align__(16) bf16 Xs[TT * LDX], Ws[TT * LDX];
    __shared__ float wt[TT];
    if (skip) return;
    int bh = blockIdx.y, ci = blockIdx.z, NC = gridDim.z;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int mt = warp % MT, n0 = warp / MT * NTW * 8;
    bool busy = warp < MT * WPR;
    float acc[NTW][4];
#pragma unroll
    for (int nt = 0; nt < NTW; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[nt][i] = 0.f;
    int t0 = ci * L, n = min(L, T - t0);
    const bf16* xh = x + ((long)bh * T + t0) * D;
    for (int s0 = 0; s0 < n; s0 += TT) {
        int nv = min(TT, n - s0);
        __syncthreads();  // every warp is done with the previous tile
        load_rows_async(Xs, LDX, xh + (long)s0 * D, nv, TT, D);
        if (w && threadIdx.x < TT) wt[threadIdx.x] = (int)threadIdx.x < nv ? w[(long)bh * T + t0 + s0 + threadIdx.x] : 0.f;
        asm volatile("cp.async.wait_all;" ::: "memory");
        __syncthreads();
        if (w) {
            for (int i = threadIdx.x; i < TT * D / 2; i += blockDim.x) {
                int r = i / (D / 2), c = 2 * (i % (D / 2));
                u32 xv = *(const u32*)(Xs + r * LDX + c);
                *(u32*)(Ws + r * LDX + c) = pack2(wt[r] * __uint_as_float(xv << 16), wt[r] * __uint_as_float(xv & 0xffff0000u));
            }
            __syncthreads();
        }
        if (busy)
#pragma unroll
            for (int kk = 0; kk < TT; kk += 16) {
                u32 af[4];
                lda_kmajor(af, Xs, LDX, mt * 16, kk);  // A(a, τ) = x_τa
#pragma unroll
                for (int nt = 0; nt < NTW; nt += 2) {
                    u32 bfr[4];
                    ldb2_kmajor(bfr, w ? Ws : Xs, LDX, kk, n0 + nt * 8);  // B(τ, b) = w_τ x_τb
                    mma16816(acc[nt], af, bfr);
                    mma16816(acc[nt + 1], af, bfr + 2);
                }
            }
    }
    if (!busy) return;
    bf16* z = out + ((long)bh * NC + ci) * Slot<D>::elems + Slot<D>::z;
#pragma unroll
    for (int nt = 0; nt < NTW; nt++)
#pragma unroll
        for (int h = 0; h < 2; h++)
            *(u32*)(z + (mt * 16 + g + 8 * h) * D + n0 + nt * 8 + 2 * t) = pack2(acc[nt][2 * h], acc[nt][2 * h + 1]);
}

// In place over the chunks of each head: the per-chunk contributions Δ_i become the discounted
// cumulative sums that enter each chunk. Forward (reverse = 0): S_i = Σ_{j<i} e^{Γ_{j+1}+…+Γ_{i−1}} Δ_j,
// i.e. run = 0; S_i = run; run = e^{Γ_i} run + Δ_i. Reverse: the same from the last chunk down,
// giving R_i = ∂L/∂ΔS_i (f32 running sums). The gates' gradient needs no inner product with the
// forward states here: sp_bwd_gates takes it from per-token terms.
// Block (bh, slice of THREADS·8 elements); memory-bound: each thread owns one 16-byte vector
// (8 bf16) of every chunk's slot (state and Z alike), so a warp moves 512 contiguous bytes per
// access, and the next chunk's vector is loaded before this one is written (the loop over chunks
// is sequential, so the load must not wait on the store).
#define DISC_VEC 8
__device__ __forceinline__ void unpack8(float* f, uint4 v) {
    u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ void sp_discumsum(bf16* st, const float* Gam, long per_chunk, int NC, int reverse) {
    int bh = blockIdx.x;
    long e0 = ((long)blockIdx.y * THREADS + threadIdx.x) * DISC_VEC;  // this thread's vector
    if (e0 >= per_chunk) return;  // per_chunk is a multiple of DISC_VEC
    bf16* head = st + (long)bh * NC * per_chunk + e0;
    float run[DISC_VEC];
#pragma unroll
    for (int i = 0; i < DISC_VEC; i++) run[i] = 0.f;
    // the last chunk's contribution in this order enters no state (sp_chunk_states skips it)
    uint4 cur = make_uint4(0, 0, 0, 0);
    if (NC > 1) cur = *(const uint4*)(head + (long)(reverse ? NC - 1 : 0) * per_chunk);
#pragma unroll 1
    for (int step = 0; step < NC; step++) {
        int ci = reverse ? NC - 1 - step : step;
        uint4 next = make_uint4(0, 0, 0, 0);
        if (step + 2 < NC) next = *(const uint4*)(head + (long)(reverse ? ci - 1 : ci + 1) * per_chunk);
        float decay = expf(Gam[bh * NC + ci]), d[DISC_VEC];
        unpack8(d, cur);
        // one 16-byte store (a plain uint4 assignment compiles to four 4-byte ones)
        __stcg((uint4*)(head + (long)ci * per_chunk),
               make_uint4(pack2(run[0], run[1]), pack2(run[2], run[3]), pack2(run[4], run[5]), pack2(run[6], run[7])));
#pragma unroll
        for (int i = 0; i < DISC_VEC; i++) run[i] = run[i] * decay + d[i];
        cur = next;
    }
}

// ---------------------------------------------------------------------------------------------
// For the QT = 16·RM·WARPS tokens of a block (one chunk, one head) and that chunk's state
// S[a] (b × j): Y_a = X S[a] (tokens × E) for every a; r = Σ_a x_a ⊙ Y_a (R) and/or
// dx[:, a] = 2·rowdot(Y_a, W) (DX). r is f32 [BH][T][E], dx f32 [BH][T][D].
// Each warp owns 16·RM rows: their X fragments stay in registers for the whole loop over a (X is
// the same for every a), and each B fragment of S[a] (ldmatrix) feeds RM row blocks. Y_a is never
// held whole: one pair of 8-column tiles at a time is formed and folded into r and the rowdot
// (scaling X's fragments by x_a instead and accumulating r in place measured no faster).
// dx columns go through an 8-column window in shared memory, flushed as 32-byte row pieces.
template <int D, bool R, bool DX>
__device__ void sp_read(float* r, float* dx, const bf16* x, const bf16* S, const bf16* w, int T, int L, int NC) {
    typedef Dims<D> Dm;
    constexpr int E = Dm::E, NT = Dm::NT, RM = Dm::RM, QT = 16 * RM * WARPS, KS = D / 16;
    // S[a] in shared memory as it is stored, [j][b] (full states: on Hopper, whose states are
    // tile-packed, r and dx run as the two wgmma passes instead — see the entry points)
    constexpr int LDX = D + 8, LDS = D + 8, LDW = E + 8, LDD = 9;
    bf16* Sbuf = (bf16*)smem;       // two stages of S[a], [E][LDS]
    bf16* Xs = Sbuf + 2 * E * LDS;  // [QT][LDX]
    bf16* Ws = Xs + QT * LDX;       // [QT][LDW] (DX)
    float* dXs = (float*)(Ws + QT * LDW);  // [QT][LDD]: columns a − a mod 8 … (DX)
    int tile = blockIdx.x, bh = blockIdx.y, ci = blockIdx.z;
    int t0 = ci * L + tile * QT;
    if (tile * QT >= L || t0 >= T) return;
    int nv = min(min(QT, L - tile * QT), T - t0);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, row0 = warp * 16 * RM;
    // S[a] of this chunk into stage st (contiguous)
    auto load_slice = [&](int a, bf16* st) {
        load_rows_async(st, LDS, S + ((long)bh * NC + ci) * Slot<D>::elems + (long)a * D * E, E, E, D);
    };
    load_slice(0, Sbuf);
    cp_async_commit();
    load_rows(Xs, LDX, x + ((long)bh * T + t0) * D, nv, QT, D);
    if (DX) load_rows(Ws, LDW, w + ((long)bh * T + t0) * E, nv, QT, E);
    __syncthreads();
    u32 xf[RM][KS][4];
#pragma unroll
    for (int m = 0; m < RM; m++)
#pragma unroll
        for (int ks = 0; ks < KS; ks++) lda(xf[m][ks], Xs, LDX, row0 + 16 * m, ks * 16);
    u32 wp[RM][2][DX ? NT : 1];  // W at rows g, g+8 of each row block, columns 8·nt + 2t, +1
    if (DX)
#pragma unroll
        for (int m = 0; m < RM; m++)
#pragma unroll
            for (int h = 0; h < 2; h++)
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
                    wp[m][h][nt] = *(const u32*)(Ws + (row0 + 16 * m + 8 * h + g) * LDW + nt * 8 + 2 * t);
    float racc[RM][R ? NT : 1][4];
#pragma unroll
    for (int m = 0; m < RM; m++)
#pragma unroll
        for (int nt = 0; nt < (R ? NT : 1); nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) racc[m][nt][i] = 0.f;
    for (int a = 0; a < D; a++) {
        if (a + 1 < D) load_slice(a + 1, Sbuf + ((a + 1) & 1) * E * LDS);
        cp_async_commit();
        cp_async_wait_prev();
        __syncthreads();
        const bf16* Ss = Sbuf + (a & 1) * E * LDS;
        float xa[RM][2], p[RM][2];
#pragma unroll
        for (int m = 0; m < RM; m++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                xa[m][h] = R ? b2f(Xs[(row0 + 16 * m + 8 * h + g) * LDX + a]) : 0.f;
                p[m][h] = 0.f;
            }
#pragma unroll
        for (int nt = 0; nt < NT; nt += 2) {
            float y[RM][2][4];
#pragma unroll
            for (int m = 0; m < RM; m++)
#pragma unroll
                for (int j = 0; j < 2; j++)
#pragma unroll
                    for (int i = 0; i < 4; i++) y[m][j][i] = 0.f;
#pragma unroll
            for (int ks = 0; ks < KS; ks++) {
                u32 bfr[4];
                ldb2_nmajor(bfr, Ss, LDS, nt * 8, ks * 16);
#pragma unroll
                for (int m = 0; m < RM; m++) {
                    mma16816(y[m][0], xf[m][ks], bfr);
                    mma16816(y[m][1], xf[m][ks], bfr + 2);
                }
            }
#pragma unroll
            for (int m = 0; m < RM; m++)
#pragma unroll
                for (int j = 0; j < 2; j++)
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        if (R) racc[m][R ? nt + j : 0][i] += xa[m][i >> 1] * y[m][j][i];
                        if (DX) {
                            u32 wv = wp[m][i >> 1][DX ? nt + j : 0];
                            p[m][i >> 1] += y[m][j][i] * __uint_as_float((i & 1) ? wv & 0xffff0000u : wv << 16);
                        }
                    }
        }
        if (DX) {
#pragma unroll
            for (int m = 0; m < RM; m++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    float s = quad_sum(p[m][h]);
                    if (t == 0) dXs[(row0 + 16 * m + 8 * h + g) * LDD + (a & 7)] = 2.f * s;
                }
        }
        __syncthreads();  // stage (a & 1) is refilled by the next iteration's copy
        if (DX && (a & 7) == 7)  // flush the window; the next writes come after the next barrier
            for (int i = threadIdx.x; i < nv * 8; i += blockDim.x)
                dx[((long)bh * T + t0 + i / 8) * D + a - 7 + i % 8] = dXs[(i / 8) * LDD + i % 8];
    }
    if (R)
#pragma unroll
        for (int m = 0; m < RM; m++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    int row = row0 + 16 * m + 8 * h + g, col = nt * 8 + 2 * t;
                    if (row < nv)
                        *(float2*)(r + ((long)bh * T + t0 + row) * E + col) =
                            make_float2(racc[m][R ? nt : 0][2 * h], racc[m][R ? nt : 0][2 * h + 1]);
                }
}

// ---------------------------------------------------------------------------------------------
// Hopper (sm_90a) forms of sp_chunk_states and sp_read: the same products on wgmma, which reads
// its B operand from shared memory once for a whole warpgroup (4 warps, 64 rows) and runs
// asynchronously, where mma.sync has every warp load its own B fragments (the shared-memory
// bandwidth that bounded the kernels above). A stays in registers, scaled per a as above. Built
// when NVRTC compiles for compute_90a (see device.rs); the entry points below pick them then.
#if SP_WGMMA
// B operands live in shared memory as 8-row core matrices: rows r of an R × E bf16 matrix, their
// 16-byte pieces (8 columns) at ((r / 8) · E/8 + column / 8) · 64 + (r % 8) · 8. Consecutive
// threads fill one core matrix (conflict-free) from 8 rows of global memory, 64 bytes a row a
// warp. Row r comes from row_src(r), E contiguous elements there; rows ≥ nvalid are zero-filled.
template <int E, class RowSrc>
__device__ __forceinline__ void load_core_rows(bf16* dst, RowSrc row_src, int rows, int nvalid) {
    for (int i = threadIdx.x; i < rows * E / 8; i += blockDim.x) {
        int r8 = i & 7, cg = (i >> 3) % (E / 8), rg = i / E, row = rg * 8 + r8;
        bool ok = row < nvalid;
        cp_async16(dst + (rg * (E / 8) + cg) * 64 + r8 * 8, row_src(ok ? row : 0) + cg * 8, ok);
    }
}
// cp.async.wait_group N: all but the N most recent groups of this thread have landed.
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

template <int D> struct Wg {
    static constexpr int E = Dims<D>::E;
    // shared-memory stages (loads run ST − 2 ahead): sp_chunk_states, sp_read
    static constexpr int ST = D >= 128 ? 3 : 4;
    static constexpr int RST = D >= 128 ? 3 : 6;
    // sp_read: m64 row tiles per warpgroup, tokens per block (two warpgroups)
    static constexpr int RW = D >= 128 ? 1 : 2;
    static constexpr int QT = 128 * RW;
    // sp_chunk_states: a warpgroup's task is 4·U values of a (U per warp, consecutive) of one
    // 16-wide tile of a against one tile of b at or after it; two tasks a block.
    static constexpr int U = D >= 128 ? 2 : 4;
    static constexpr int SUBS = 16 / (4 * U);  // tasks per pair of tiles
    static constexpr int TILES = D / 16;
    static constexpr int TASKS = TILES * (TILES + 1) / 2 * SUBS;
    static constexpr int BLOCKS = (TASKS + 1) / 2;
    static constexpr int TT = 64;  // tokens per stage
};

// sp_chunk_states on wgmma, writing the tile-packed state. A warpgroup's product has the 64 rows
// (a, b) of its U units — unit u of warp w: a = a_w + u, b in its tile — the E columns of y, and
// contracts over the chunk's tokens, 16 at a time: A(row, τ) = x_τa x_τb, the ldmatrix fragment
// of x_τb scaled by x_τa (registers, a fresh set per step so the previous step's products can
// still be reading the other), B = y's 16 × E rows (shared memory).
// A chunk whose contribution enters no state (`skip`) writes nothing: the cumsum writes its slot.
template <int D>
__device__ void sp_chunk_states_wg(bf16* out, const bf16* x, const bf16* y, int T, int L, bool skip) {
    if (skip) return;
    typedef Wg<D> W;
    constexpr int E = W::E, U = W::U, TT = W::TT, ST = W::ST, LDX = D + 8;
    constexpr int XST = TT * LDX, STAGE = XST + TT * E;  // a stage: Xs [TT][LDX], then y in core matrices
    bf16* buf = (bf16*)smem;
    int bh = blockIdx.y, ci = blockIdx.z, NC = gridDim.z;
    int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, t = lane & 3;
    // this warpgroup's task: tile ta of a, tile tb ≥ ta of b, part sub of ta's 16 values
    int task = blockIdx.x * 2 + wg;
    bool live = task < W::TASKS;  // an odd count leaves a second warpgroup idle (it still syncs)
    task = min(task, W::TASKS - 1);
    int pair = task / W::SUBS, ta = 0;
    while (pair >= W::TILES - ta) pair -= W::TILES - ta++;
    int tb = ta + pair, a_w = 16 * ta + (task % W::SUBS) * 4 * U + warp * U;
    int t0 = ci * L, n = min(L, T - t0);
    const bf16* xh = x + ((long)bh * T + t0) * D;
    const bf16* yh = y + ((long)bh * T + t0) * E;
    auto issue = [&](int tile) {
        int s0 = tile * TT;
        if (s0 < n) {
            bf16* st = buf + (tile % ST) * STAGE;
            load_rows_async(st, LDX, xh + (long)s0 * D, min(TT, n - s0), TT, D);
            load_core_rows<E>(st + XST, [&](int r) { return yh + (long)(s0 + r) * E; }, TT, n - s0);
        }
        cp_async_commit();
    };
    float acc[U][E / 2];
#pragma unroll
    for (int u = 0; u < U; u++)
#pragma unroll
        for (int i = 0; i < E / 2; i++) acc[u][i] = 0.f;
    u32 af[2][U][4];  // two sets: step k scales into set k & 1
    int tiles = (n + TT - 1) / TT;
#pragma unroll
    for (int s = 0; s < ST - 2; s++) issue(s);
    for (int tile = 0; tile < tiles; tile++) {
        cp_async_wait<ST - 3>();
        fence_async_smem();
        __syncthreads();  // tile landed for all; every warpgroup is past the products of tile − 2
        issue(tile + ST - 2);
        const bf16* Xs = buf + (tile % ST) * STAGE;
        const bf16* Ys = Xs + XST;
#pragma unroll
        for (int k = 0; k < TT / 16; k++) {
            u32(&as)[U][4] = af[k & 1];
            // x_τa of the U values of a (one vector load a token row) as bf16 pairs over the
            // fragment's token columns (2t, 2t+1) and (2t+8, 2t+9)
            const bf16* p = Xs + (k * 16 + 2 * t) * LDX + a_w;
            u32 s01[U], s89[U];
            if constexpr (U == 4) {
                uint2 r0 = *(const uint2*)p, r1 = *(const uint2*)(p + LDX);
                uint2 r8 = *(const uint2*)(p + 8 * LDX), r9 = *(const uint2*)(p + 9 * LDX);
                s01[0] = __byte_perm(r0.x, r1.x, 0x5410), s01[1] = __byte_perm(r0.x, r1.x, 0x7632);
                s01[2] = __byte_perm(r0.y, r1.y, 0x5410), s01[3] = __byte_perm(r0.y, r1.y, 0x7632);
                s89[0] = __byte_perm(r8.x, r9.x, 0x5410), s89[1] = __byte_perm(r8.x, r9.x, 0x7632);
                s89[2] = __byte_perm(r8.y, r9.y, 0x5410), s89[3] = __byte_perm(r8.y, r9.y, 0x7632);
            } else {
                static_assert(U == 2, "two or four values of a a warp");
                u32 r0 = *(const u32*)p, r1 = *(const u32*)(p + LDX);
                u32 r8 = *(const u32*)(p + 8 * LDX), r9 = *(const u32*)(p + 9 * LDX);
                s01[0] = __byte_perm(r0, r1, 0x5410), s01[1] = __byte_perm(r0, r1, 0x7632);
                s89[0] = __byte_perm(r8, r9, 0x5410), s89[1] = __byte_perm(r8, r9, 0x7632);
            }
            u32 xb[4];
            lda_kmajor(xb, Xs, LDX, 16 * tb, k * 16);  // A(b, τ) = x_τb
#pragma unroll
            for (int u = 0; u < U; u++) {
                as[u][0] = mul_bf16x2(xb[0], s01[u]);
                as[u][1] = mul_bf16x2(xb[1], s01[u]);
                as[u][2] = mul_bf16x2(xb[2], s89[u]);
                as[u][3] = mul_bf16x2(xb[3], s89[u]);
            }
            wg_fence();
            // y's rows k·16 … k·16 + 15: core matrices along tokens E·16 bytes apart, along E 128
            unsigned long long desc = wg_desc(Ys + k * 16 * E, E * 16, 128);
#pragma unroll
            for (int u = 0; u < U; u++) wgmma<E, 1>(acc[u], as[u], desc, 1);
            wg_commit();
            wg_wait<1>();
        }
    }
    wg_wait<0>();
    if (!live) return;
    bf16* oc = out + ((long)bh * NC + ci) * Slot<D>::elems;
    int g = lane >> 2;
#pragma unroll
    for (int u = 0; u < U; u++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            bf16* orow = oc + core_row(E, packed_row(D, a_w + u, 16 * tb + g + 8 * h)) + 2 * t;
#pragma unroll
            for (int nt = 0; nt < E / 8; nt++)
                *(u32*)(orow + nt * CORE_PIECE) = pack2(acc[u][4 * nt + 2 * h], acc[u][4 * nt + 2 * h + 1]);
        }
}

// sp_read on wgmma, for the 128·RW tokens of a block (two warpgroups of 64·RW rows), over the
// tile-packed state:
//   r = Σ_a (diag(x_a) X) S[a]: for each a, products of 64 × NR (the columns of r its consumer
//       reads, see sp_read_wg) with A = X's fragments scaled by x_a (registers; X is loaded once)
//       and B = the packed rows of a (b ≥ 16·tile(a), [b][j], N-major core matrices); the A
//       fragments of b-tiles after a's are scaled by 2·x_a, as each of their rows stands for
//       S[a][b] and S[b][a].
//   dx = 2 Σ_b (diag(x_b) W) S[·][b]ᵀ: the same contraction regrouped so that it is one
//       product too (dx[t, a] = 2 Σ_{b,j} x_tb w_tj S[a][b][j]) — for each b, E/16 products of
//       64 × D with A = W's fragments scaled by x_b and B = S[a][b][j] over (j, a) (K-major),
//       its D rows gathered from the packed state. No per-a row sums, unlike the mma.sync form.
// Slices of S stream through ST shared-memory stages, ST − 2 ahead of the products. Slice i's
// rows ≥ 16·tile(i) are i's own packed rows, contiguous in the stored state (r: S[a = i][b];
// dx: S[b = i][a] = S[a][b]): one bulk copy, completing on the stage's mbarrier — measured
// against 16-byte cp.async pieces by bench/wgmma_stream.cu, the streaming loop 2.31 → 1.59 ms
// (1.49 without streaming). The r read needs no others; dx's rows a before them are S[a][b],
// in a's rows: one tensor copy for each earlier tile of a (GatherMaps; by 16-byte cp.async
// pieces they cost 0.11 ms of the ∂q read's 0.64 at T = 4k). g0: the chunk's first 8-row group
// in the whole state tensor (the maps' outer coordinate).
template <int D, bool DXPASS, int KSTEPS, int N, int RW>
__device__ __forceinline__ void wg_read_pass(float (*acc)[N / 2], const u32 (*frag)[KSTEPS][4], const bf16* Xs,
                                              int LDX, int row0, const bf16* Sc, bf16* Sbuf, const GatherMaps* maps,
                                              int g0) {
    typedef Wg<D> W;
    constexpr int E = W::E, ST = W::RST, SLICE = D * E;
    int lane = threadIdx.x & 31, g = lane >> 2;
    __shared__ unsigned long long full[ST];  // stage s's copies have landed
    auto issue = [&](int i) {
        bf16* st = Sbuf + (i % ST) * SLICE;
        int own = i & ~15;
        if (i < D && threadIdx.x == 0) {
            if (DXPASS && own > 0) {
                mbar_expect_tx(full + i % ST, own * E * 2);
                for (int ta = 0; ta < i >> 4; ta++)  // rows a = 16·ta … 16·ta + 15, at their index
                    tensor_copy_5d(st + 16 * ta * E, maps->tile + ta, (i & 7) * 8, 0, 0, 0,
                                   g0 + (packed_before(D, 16 * ta) - 16 * ta) / 8 + (i >> 3), full + i % ST);
            }
            bulk_copy(st + own * E, Sc + (long)packed_before(D, i) * E, (D - own) * E * 2, full + i % ST);
        }
    };
    if (threadIdx.x == 0)
        for (int s = 0; s < ST; s++) mbar_init(full + s, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    __syncthreads();
    u32 sc[2][RW][KSTEPS][4];  // two sets: slice i scales into set i & 1
#pragma unroll
    for (int s = 0; s < ST - 2; s++) issue(s);
    for (int i0 = 0; i0 < D; i0 += 2) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int i = i0 + h, first = DXPASS ? 0 : i >> 4;  // r: the k-steps of b-tiles ≥ tile(a)
            mbar_wait(full + i % ST, (i / ST) & 1);
            __syncthreads();  // slice i landed for all; every warpgroup is past slice i − 2's products
            issue(i + ST - 2);
            const bf16* Ss = Sbuf + (i % ST) * SLICE;
#pragma unroll
            for (int m = 0; m < RW; m++) {
                bf16 x_lo = Xs[(row0 + 64 * m + g) * LDX + i], x_hi = Xs[(row0 + 64 * m + g + 8) * LDX + i];
                u32 s_lo = bf16_pair(x_lo, x_lo), s_hi = bf16_pair(x_hi, x_hi);
                u32 d_lo = mul_bf16x2(s_lo, 0x40004000u), d_hi = mul_bf16x2(s_hi, 0x40004000u);  // × 2, exact
#pragma unroll
                for (int k = 0; k < KSTEPS; k++) {
                    u32 lo = DXPASS || k == first ? s_lo : d_lo, hi = DXPASS || k == first ? s_hi : d_hi;
                    sc[h][m][k][0] = mul_bf16x2(frag[m][k][0], lo);
                    sc[h][m][k][1] = mul_bf16x2(frag[m][k][1], hi);
                    sc[h][m][k][2] = mul_bf16x2(frag[m][k][2], lo);
                    sc[h][m][k][3] = mul_bf16x2(frag[m][k][3], hi);
                }
            }
            wg_fence();
#pragma unroll
            for (int k = 0; k < KSTEPS; k++) {
                if (k < first) continue;
                // r: rows b = 16k … of S[a] ([b][j]; a stage keeps rows at their index, those before
                // 16·tile(a) unused), core matrices along b E·16 bytes apart,
                // along j 128. dx: 16 columns j of S[·][b] ([a][j]), along j 128, along a E·16.
                unsigned long long desc =
                    DXPASS ? wg_desc(Ss + k * 128, 128, E * 16) : wg_desc(Ss + k * 16 * E, E * 16, 128);
#pragma unroll
                for (int m = 0; m < RW; m++) wgmma<N, DXPASS ? 0 : 1>(acc[m], sc[h][m][k], desc, 1);
            }
            wg_commit();
            wg_wait<1>();
        }
    }
    wg_wait<0>();
}

// maps: the gathered rows' tensor maps (dx only).
template <int D, bool R, bool DX>
__device__ void sp_read_wg(float* r, float* dx, const bf16* x, const bf16* S, const bf16* w, int T, int L, int NC,
                           const GatherMaps* maps = nullptr) {
    static_assert(R != DX, "r and dx together are two passes here (see the entry points)");
    typedef Wg<D> W;
    constexpr int E = W::E, RW = W::RW, QT = W::QT, ST = W::RST, LDX = D + 8, LDW = E + 8, SLICE = D * E;
    bf16* Sbuf = (bf16*)smem;          // ST stages of one slice of S (at most D × E)
    bf16* Xs = Sbuf + ST * SLICE;      // [QT][LDX]
    bf16* Ws = Xs + QT * LDX;          // [QT][LDW] (DX)
    int tile = blockIdx.x, bh = blockIdx.y, ci = blockIdx.z;
    int t0 = ci * L + tile * QT;
    if (tile * QT >= L || t0 >= T) return;
    int nv = min(min(QT, L - tile * QT), T - t0);
    int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int row0 = wg * 64 * RW + warp * 16;  // this warp's rows in tile m: row0 + 64·m …
    const bf16* Sc = S + ((long)bh * NC + ci) * Slot<D>::elems;
    load_rows(Xs, LDX, x + ((long)bh * T + t0) * D, nv, QT, D);
    if (DX) load_rows(Ws, LDW, w + ((long)bh * T + t0) * E, nv, QT, E);
    __syncthreads();
    // the A operand, in registers for the whole pass: X's fragments (r) or W's (dx)
    constexpr int KA = DX ? E : D, N = DX ? D : E, LDO = DX ? D : E;
    u32 af[RW][KA / 16][4];
#pragma unroll
    for (int m = 0; m < RW; m++)
#pragma unroll
        for (int k = 0; k < KA / 16; k++) lda(af[m][k], DX ? Ws : Xs, DX ? LDW : LDX, row0 + 64 * m, k * 16);
    float acc[RW][N / 2];
#pragma unroll
    for (int m = 0; m < RW; m++)
#pragma unroll
        for (int i = 0; i < N / 2; i++) acc[m][i] = 0.f;
    wg_read_pass<D, DX, KA / 16, N, RW>(acc, af, Xs, LDX, row0, Sc, Sbuf, maps,
                                        (int)(((long)bh * NC + ci) * Slot<D>::rows / 8));
    float* out = DX ? dx : r;
    const float scale = DX ? 2.f : 1.f;
#pragma unroll
    for (int m = 0; m < RW; m++)
#pragma unroll
        for (int nt = 0; nt < N / 8; nt++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int row = row0 + 64 * m + g + 8 * h;
                if (row < nv)
                    *(float2*)(out + ((long)bh * T + t0 + row) * LDO + nt * 8 + 2 * t) =
                        make_float2(scale * acc[m][4 * nt + 2 * h], scale * acc[m][4 * nt + 2 * h + 1]);
            }
}
#endif  // SP_WGMMA

// ---------------------------------------------------------------------------------------------
// The intra-chunk kernels stream tiles of `rows` rows (r0.. < end) of a D-wide and an E-wide bf16
// operand and their G values through two shared-memory stages: while one tile is multiplied,
// the next is copied asynchronously (rows past T zero-filled) — G too, so that no warp waits on
// a global load inside the loop (a synchronous G load there held every warp at the next
// barrier). One block barrier a tile: once it has landed, every warp is past the previous tile,
// whose stage the next tile's copy then refills. A tile's decay factors against its reference
// G_ref — the last valid row of a key tile (keys_last), else the first: F = e^{G_ref − G} for
// keys, e^{G − G_ref} for queries, both ≤ 1 as G never increases — are made by each warp that
// needs them, in its own row of Fs (1–2 exps a lane; made once for the block, they cost two more
// barriers a tile). A pair (query t, key s) of a tile that lies wholly on one side of the other's
// rows then has e^{G_t − G_s} = (row factor against G_ref) · F without an exp per element.
template <int D> struct TileStream {
    static constexpr int E = Dims<D>::E;
    bf16 *A, *B;  // two stages each: [rows][D + 8], [rows][E + 8]
    float *Gs, *Fs;  // two stages of [rows] G; [WARPS][rows] decay factors (Fs may be null: none)
    const bf16 *a, *b;
    const float* G;
    long base;  // this head's first row in [BH][T]
    int end, T, rows;
    bool keys_last;
    const float* dz = nullptr;  // a second per-row value streamed beside G (∂Z of queries) …
    float* Zs = nullptr;        // … into two stages of [rows]
    // Issues tile r0 into stage s (a group committed even when nothing is left to load).
    __device__ __forceinline__ void issue(int r0, int s) {
        if (r0 < end) {
            int n = min(rows, T - r0);
            load_rows_async(A + s * rows * (D + 8), D + 8, a + (base + r0) * D, n, rows, D);
            load_rows_async(B + s * rows * (E + 8), E + 8, b + (base + r0) * E, n, rows, E);
            for (int i = threadIdx.x; i < rows; i += blockDim.x) {
                cp_async4(Gs + s * rows + i, G + base + r0 + min(i, n - 1), i < n);
                if (dz) cp_async4(Zs + s * rows + i, dz + base + r0 + min(i, n - 1), i < n);
            }
        }
        cp_async_commit();
    }
    // At iteration `it` (tile r): waits until tile r is in shared memory, then issues the next
    // tile into the other stage; returns tile r's stage.
    __device__ __forceinline__ int advance(int r, int it) {
        int s = it & 1;
        asm volatile("cp.async.wait_all;" ::: "memory");
        __syncthreads();
        issue(r + rows, s ^ 1);
        return s;
    }
    // The calling warp's decay factors of tile r (stage s).
    __device__ __forceinline__ const float* decay(int r, int s) const {
        const float* g = Gs + s * rows;
        float* f = Fs + (threadIdx.x >> 5) * rows;
        int n = min(rows, T - r);
        float gref = g[keys_last ? n - 1 : 0];
        __syncwarp();  // the warp's reads of its previous factors are done
        for (int i = threadIdx.x & 31; i < rows; i += 32)
            f[i] = i < n ? expf(keys_last ? gref - g[i] : g[i] - gref) : 0.f;
        __syncwarp();
        return f;
    }
    __device__ __forceinline__ const bf16* a_tile(int s) const { return A + s * rows * (D + 8); }
    __device__ __forceinline__ const bf16* b_tile(int s) const { return B + s * rows * (E + 8); }
    __device__ __forceinline__ const float* g_tile(int s) const { return Gs + s * rows; }
    __device__ __forceinline__ const float* dz_tile(int s) const { return Zs + s * rows; }
};

// The denominator's quadratic form for the 16 rows of this warp: for the rows row0 + g and
// row0 + g + 8 of X (row-major in shared memory), u = X·Z (f32, the warp's accumulator tiles:
// Z symmetric, its [D][D + 8] rows in shared memory) and x·Z·x (whole rows: quad sums).
template <int D>
__device__ __forceinline__ void quad_form(float (*u)[4], float* xzx, const bf16* X, int ldx, int row0, const bf16* Zs) {
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int nt = 0; nt < D / 8; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) u[nt][i] = 0.f;
    mma_rows<D, D / 8>(u, X, ldx, row0, Zs, D + 8);
    float p0 = 0.f, p1 = 0.f;
#pragma unroll
    for (int nt = 0; nt < D / 8; nt++) {
        u32 x0 = *(const u32*)(X + (row0 + g) * ldx + nt * 8 + 2 * t);
        u32 x1 = *(const u32*)(X + (row0 + g + 8) * ldx + nt * 8 + 2 * t);
        p0 += u[nt][0] * __uint_as_float(x0 << 16) + u[nt][1] * __uint_as_float(x0 & 0xffff0000u);
        p1 += u[nt][2] * __uint_as_float(x1 << 16) + u[nt][3] * __uint_as_float(x1 & 0xffff0000u);
    }
    xzx[0] = quad_sum(p0);
    xzx[1] = quad_sum(p1);
}
// Issues the copy of the chunk's Z (its slot's last D rows) into shared memory as [D][D + 8] rows.
template <int D> __device__ __forceinline__ void load_z_async(bf16* dst, const bf16* S, int bh, int ci, int NC) {
    load_rows_async(dst, D + 8, S + ((long)bh * NC + ci) * Slot<D>::elems + Slot<D>::z, D, D, D);
}

// ---------------------------------------------------------------------------------------------
// Intra-chunk attention of 128 queries (8 warps × 16) against the chunk's earlier keys, 64 at a
// time, then the combine with the inter-chunk numerator `inter` ([BH][T][E] f32) and denominator
// q̃ᵀZq̃ = e^{G}·qsᵀZqs (Z from the chunk's slot of the states S, formed before the keys stream).
// The intra-chunk denominator sums the bf16 weights that the numerator's product takes, so that
// a row whose weight sits on one key gets y = v exactly, as it did with v's column of ones.
template <int D>
__device__ void sp_intra_fwd(float* y, float* log_norm, const bf16* qs, const bf16* kr, const bf16* vp, const float* G,
                             const float* inter, const bf16* S, int T, int H, int L, float eps) {
    typedef Dims<D> Dm;
    constexpr int E = Dm::E, NT = E / 8, QT = 128, KT = 64, LDQ = D + 8, LDV = E + 8;
    bf16* Qs = (bf16*)smem;        // [QT][LDQ]
    bf16* Ks = Qs + QT * LDQ;      // two stages of [KT][LDQ]
    bf16* Vs = Ks + 2 * KT * LDQ;  // two stages of [KT][LDV]
    bf16* Zs = Vs + 2 * KT * LDV;  // [D][D + 8]
    float* Gk = (float*)(Zs + D * (D + 8));  // two stages of [KT], then [WARPS][KT] decay factors
    int tile = blockIdx.x, bh = blockIdx.y, ci = blockIdx.z, b = bh / H, h = bh % H;
    int c0 = ci * L, q0 = c0 + tile * QT;
    if (tile * QT >= L || q0 >= T) return;
    int nq = min(QT, T - q0);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, row0 = warp * 16;
    int kend = min(q0 + QT, T);
    TileStream<D> keys{Ks, Vs, Gk, Gk + 2 * KT, kr, vp, G, (long)bh * T, kend, T, KT, true};
    // the queries and Z, then the first key tile (a group of its own, landing under quad_form)
    load_rows_async(Qs, LDQ, qs + ((long)bh * T + q0) * D, nq, QT, D);
    load_z_async<D>(Zs, S, bh, ci, gridDim.z);
    cp_async_commit();
    keys.issue(c0, 0);
    cp_async_wait_prev();
    __syncthreads();
    int qi0 = q0 + row0 + g, qi1 = qi0 + 8;
    float Gq0 = qi0 < T ? G[(long)bh * T + qi0] : 0.f, Gq1 = qi1 < T ? G[(long)bh * T + qi1] : 0.f;
    float den_inter[2];
    {
        float u[D / 8][4];
        quad_form<D>(u, den_inter, Qs, LDQ, row0, Zs);
    }
    float acc[NT][4], rs0 = 0.f, rs1 = 0.f;  // rs: the thread's part of its rows' weight sums
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[nt][i] = 0.f;
    for (int k0 = c0, it = 0; k0 < kend; k0 += KT, it++) {
        int st = keys.advance(k0, it);
        const bf16 *Kc = keys.a_tile(st), *Vc = keys.b_tile(st);
        const float* Gc = keys.g_tile(st);
        if (k0 <= q0 + row0 + 15) {  // else every key comes after every query of this warp
            float s[KT / 8][4];
#pragma unroll
            for (int nt = 0; nt < KT / 8; nt++)
#pragma unroll
                for (int i = 0; i < 4; i++) s[nt][i] = 0.f;
            mma_rows<D, KT / 8>(s, Qs, LDQ, row0, Kc, LDQ);
            if (k0 + KT - 1 <= q0 + row0) {  // every key of the tile precedes every query of this warp
                const float* Fc = keys.decay(k0, st);
                float gref = Gc[min(KT, T - k0) - 1];
                float a0 = qi0 < T ? expf(Gq0 - gref) : 0.f, a1 = qi1 < T ? expf(Gq1 - gref) : 0.f;
#pragma unroll
                for (int nt = 0; nt < KT / 8; nt++) {
                    float2 f = *(const float2*)(Fc + nt * 8 + 2 * t);
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        float u = s[nt][i];
                        s[nt][i] = u * u * (i >= 2 ? a1 : a0) * ((i & 1) ? f.y : f.x);
                    }
                }
            } else {
#pragma unroll
                for (int nt = 0; nt < KT / 8; nt++)
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        int qi = i >= 2 ? qi1 : qi0, kj = k0 + nt * 8 + 2 * t + (i & 1);
                        float u = s[nt][i];
                        s[nt][i] = (kj <= qi && kj < T) ? u * u * expf((i >= 2 ? Gq1 : Gq0) - Gc[kj - k0]) : 0.f;
                    }
            }
#pragma unroll
            for (int ks = 0; ks < KT / 16; ks++) {
                u32 pf[4];
                acc_to_a(pf, s[2 * ks], s[2 * ks + 1]);
                rs0 += __uint_as_float(pf[0] << 16) + __uint_as_float(pf[0] & 0xffff0000u) +
                       __uint_as_float(pf[2] << 16) + __uint_as_float(pf[2] & 0xffff0000u);
                rs1 += __uint_as_float(pf[1] << 16) + __uint_as_float(pf[1] & 0xffff0000u) +
                       __uint_as_float(pf[3] << 16) + __uint_as_float(pf[3] & 0xffff0000u);
#pragma unroll
                for (int nt = 0; nt < NT; nt += 2) {
                    u32 bfr[4];
                    ldb2_kmajor(bfr, Vc, LDV, ks * 16, nt * 8);
                    mma16816(acc[nt], pf, bfr);
                    mma16816(acc[nt + 1], pf, bfr + 2);
                }
            }
        }
    }
    // combine
    float den0 = quad_sum(rs0) + expf(Gq0) * den_inter[0], den1 = quad_sum(rs1) + expf(Gq1) * den_inter[1];
    int r0 = row0 + g, r1 = r0 + 8;
    // every load of inter before any store of y (a store might alias a later load, so the
    // compiler would keep each load behind the stores before it)
    long i0 = ((long)bh * T + q0 + min(r0, nq - 1)) * E, i1 = ((long)bh * T + q0 + min(r1, nq - 1)) * E;
    float2 in0[D / 8], in1[D / 8];
#pragma unroll
    for (int nt = 0; nt < D / 8; nt++) {
        in0[nt] = *(const float2*)(inter + i0 + nt * 8 + 2 * t);
        in1[nt] = *(const float2*)(inter + i1 + nt * 8 + 2 * t);
    }
    den0 += eps;
    den1 += eps;
#pragma unroll
    for (int nt = 0; nt < D / 8; nt++)
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            int row = hr ? r1 : r0;
            if (row >= nq) continue;
            float2 in = hr ? in1[nt] : in0[nt];
            float den = hr ? den1 : den0;
            float2 num = make_float2(acc[nt][2 * hr] + in.x, acc[nt][2 * hr + 1] + in.y);
            *(float2*)(y + ((long)(b * T + q0 + row) * H + h) * D + nt * 8 + 2 * t) = make_float2(num.x / den, num.y / den);
        }
    if (t == 0) {
        if (r0 < nq) log_norm[(long)(b * T + q0 + r0) * H + h] = logf(den0);
        if (r1 < nq) log_norm[(long)(b * T + q0 + r1) * H + h] = logf(den1);
    }
}

// ---------------------------------------------------------------------------------------------
// ∂L/∂(numerator, denominator) per query: ∂N = bf16(dy/Z') ([BH][T][E]), Z' = e^{log_norm}, and
// ∂Z = −∂N·y in f32 ([BH][T]), computed from the rounded ∂N: every product then sees
// ∂N·(v_s − y_t) with the cancellation intact (a row whose weight sits on one key has y_t ≈ v_s
// and a near-zero ∂q_t; ∂Z rounded to bf16 apart from ∂N made that an O(2⁻⁹·|∂N·v|) error).
// One warp per token.
template <int D>
__device__ void sp_bwd_prep(bf16* dN, float* dZ, const float* dy, const float* y, const float* log_norm, int B, int T,
                            int H) {
    long tok = (long)blockIdx.x * WARPS + (threadIdx.x >> 5);  // (b, t, h) row
    int lane = threadIdx.x & 31;
    if (tok >= (long)B * T * H) return;
    int h = tok % H, tt = (tok / H) % T, b = tok / H / T;
    long bht = (long)(b * H + h) * T + tt;
    constexpr int P = (D + 63) / 64;  // column pairs a lane: j = 2·lane + 64·p
    float2 dyv[P], yv[P];
#pragma unroll
    for (int p = 0; p < P; p++) {  // loads first: each would otherwise wait behind the last store
        int j = min(2 * lane + 64 * p, D - 2);
        dyv[p] = *(const float2*)(dy + tok * D + j);
        yv[p] = *(const float2*)(y + tok * D + j);
    }
    float inv = expf(-log_norm[tok]), dot = 0.f;
#pragma unroll
    for (int p = 0; p < P; p++) {
        int j = 2 * lane + 64 * p;
        if (j >= D) break;
        u32 n = pack2(dyv[p].x * inv, dyv[p].y * inv);
        dot += __uint_as_float(n << 16) * yv[p].x + __uint_as_float(n & 0xffff0000u) * yv[p].y;
        *(u32*)(dN + bht * D + j) = n;
    }
    float dz = -warp_sum(dot);
    if (lane == 0) dZ[bht] = dz;
}

// ---------------------------------------------------------------------------------------------
// The backward kernels' elementwise step for a tile on one side of the warp's rows (the tile
// factors' path): for each pair, wgt = (its row's factor a0 | a1) · (its column's F), the
// weight a = u²·wgt of the score u (kept in s when KEEP: ∂V′ needs it), ∂S = 2·∂A·u·wgt in place
// of ∂A; adds SIGN·∂A·a to the ∂G sum of its row (dg0, dg1: the thread's two rows).
template <int NT, bool KEEP, int SIGN>
__device__ __forceinline__ void weigh_tile(float (*s)[4], float (*da)[4], const float* F, float a0, float a1,
                                           float& dg0, float& dg1) {
    int t = threadIdx.x & 3;
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        float2 f = *(const float2*)(F + nt * 8 + 2 * t);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float u = s[nt][i], wgt = (i >= 2 ? a1 : a0) * ((i & 1) ? f.y : f.x), a = u * u * wgt;
            if (i >= 2) dg1 += SIGN * da[nt][i] * a; else dg0 += SIGN * da[nt][i] * a;
            if (KEEP) s[nt][i] = a;
            da[nt][i] = da[nt][i] * 2.f * u * wgt;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Intra-chunk backward, key side: 128 keys (8 warps × 16) against the chunk's later queries, QB
// at a time, then the chain rule back to the model's ∂k and ∂v for those keys (folded in here: a
// separate pass over the f32 gradients measured 0.54 ms at T = 4k):
//   ∂k = e^{(Γ−G)/2} ∂k̃ + ∂k_intra, ∂v = ∂v_inter + ∂v_intra,
// with gates ∂G_τ's key part −½ k̃·∂k̃ + ∂G_intra (dGk), k̃ from the model's f32 k (the block's bf16
// keys instead saved ≈ 0.02 ms at T = 4k and raised the device check's ∂log-gates errors by up
// to 17%).
// dkt and dvp are the inter-chunk read's ∂k̃ and ∂v ([BH][T][D], f32): the numerator's. The
// denominator's part of ∂k̃, 2·R_Z·k̃ (R_Z: the chunk's slot of the reverse states R), is formed
// here before the queries stream, as is ∂A's part from ∂Z (each query's ∂Z added to its column).
template <int D>
__device__ void sp_intra_bwd_dkv(float* dk, float* dv, float* dGk, const bf16* qs, const bf16* kr,
                                 const bf16* vp, const bf16* dN, const float* dZ, const float* G, const float* Gam,
                                 const float* k, const float* dkt, const float* dvp, const bf16* R, int T, int H,
                                 int L) {
    typedef Dims<D> Dm;
    constexpr int E = Dm::E, QB = Dm::QB, KB = 128, LDK = D + 8, LDV = E + 8;
    bf16* Ks = (bf16*)smem;        // [KB][LDK]
    bf16* Vs = Ks + KB * LDK;      // [KB][LDV]
    bf16* Qs = Vs + KB * LDV;      // two stages of [QB][LDK]
    bf16* Ns = Qs + 2 * QB * LDK;  // two stages of [QB][LDV]
    bf16* Zs = Ns + 2 * QB * LDV;  // [D][D + 8]: R_Z
    // two stages of [QB] G, [WARPS][QB] decay factors, two stages of [QB] ∂Z
    float* Gq = (float*)(Zs + D * (D + 8));
    int tile = blockIdx.x, bh = blockIdx.y, ci = blockIdx.z, NC = gridDim.z;
    int k0 = ci * L + tile * KB;
    if (tile * KB >= L || k0 >= T) return;
    int nk = min(KB, T - k0), cend = min(ci * L + L, T);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, row0 = warp * 16;
    TileStream<D> queries{Qs, Ns, Gq, Gq + 2 * QB, qs, dN, G, (long)bh * T, cend, T, QB, false,
                          dZ, Gq + (2 + WARPS) * QB};
    // the keys, their values and R_Z, then the first query tile (landing under quad_form)
    load_rows_async(Ks, LDK, kr + ((long)bh * T + k0) * D, nk, KB, D);
    load_rows_async(Vs, LDV, vp + ((long)bh * T + k0) * E, nk, KB, E);
    load_z_async<D>(Zs, R, bh, ci, NC);
    cp_async_commit();
    queries.issue(k0, 0);
    cp_async_wait_prev();
    __syncthreads();
    int kj0 = k0 + row0 + g, kj1 = kj0 + 8;
    float Gk0 = kj0 < T ? G[(long)bh * T + kj0] : 0.f, Gk1 = kj1 < T ? G[(long)bh * T + kj1] : 0.f;
    float gam = Gam[bh * NC + ci], ek0 = expf(0.5f * (gam - Gk0)), ek1 = expf(0.5f * (gam - Gk1));
    float dva[D / 8][4], dka[D / 8][4], dg0 = 0.f, dg1 = 0.f, kzk[2];
    // the denominator's ∂k = e^{(Γ−G)/2}·2R_Z·k̃ = 2e^{Γ−G}·R_Z·k (starts ∂K's accumulator), and
    // k̃·(its ∂k̃) = 2e^{Γ−G}·kᵀR_Z k (kzk, to the gates' key part below)
    quad_form<D>(dka, kzk, Ks, LDK, row0, Zs);
#pragma unroll
    for (int nt = 0; nt < D / 8; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            dva[nt][i] = 0.f;
            dka[nt][i] *= 2.f * (i >= 2 ? ek1 * ek1 : ek0 * ek0);
        }
    for (int qa = k0, it = 0; qa < cend; qa += QB, it++) {
        int stage = queries.advance(qa, it);
        const bf16 *Qc = queries.a_tile(stage), *Nc = queries.b_tile(stage);
        const float* Gc = queries.g_tile(stage);
        if (k0 + row0 <= qa + QB - 1) {  // else every query comes before every key of this warp
            float st[QB / 8][4], da[QB / 8][4];
#pragma unroll
            for (int nt = 0; nt < QB / 8; nt++)
#pragma unroll
                for (int i = 0; i < 4; i++) st[nt][i] = da[nt][i] = 0.f;
            mma_rows<D, QB / 8>(st, Ks, LDK, row0, Qc, LDK);  // Sᵀ = K Qᵀ
            mma_rows<E, QB / 8>(da, Vs, LDV, row0, Nc, LDV);  // ∂Aᵀ = V ∂Nᵀ, and ∂Z by query
            const float* Zc = queries.dz_tile(stage);
#pragma unroll
            for (int nt = 0; nt < QB / 8; nt++) {
                float2 z = *(const float2*)(Zc + nt * 8 + 2 * t);
                da[nt][0] += z.x, da[nt][1] += z.y, da[nt][2] += z.x, da[nt][3] += z.y;
            }
            if (qa >= k0 + row0 + 15) {  // every query of the tile follows every key of this warp
                // (padded queries have F = 0, zero q and ∂N: they add nothing)
                const float* Fc = queries.decay(qa, stage);
                float gref = Gc[0];
                float a0 = kj0 < T ? expf(gref - Gk0) : 0.f, a1 = kj1 < T ? expf(gref - Gk1) : 0.f;
                weigh_tile<QB / 8, true, -1>(st, da, Fc, a0, a1, dg0, dg1);  // (a key's terms count negatively)
            } else {
#pragma unroll
                for (int nt = 0; nt < QB / 8; nt++)
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        int kj = i >= 2 ? kj1 : kj0, qi = qa + nt * 8 + 2 * t + (i & 1);
                        float a = 0.f, ds = 0.f;
                        if (kj <= qi && qi < T && kj < T) {
                            float u = st[nt][i], wgt = expf(Gc[qi - qa] - (i >= 2 ? Gk1 : Gk0));
                            a = u * u * wgt;
                            ds = da[nt][i] * 2.f * u * wgt;
                            if (i >= 2) dg1 -= da[nt][i] * a; else dg0 -= da[nt][i] * a;
                        }
                        st[nt][i] = a;
                        da[nt][i] = ds;
                    }
            }
#pragma unroll
            for (int ks = 0; ks < QB / 16; ks++) {
                u32 pf[4], df[4];
                acc_to_a(pf, st[2 * ks], st[2 * ks + 1]);
                acc_to_a(df, da[2 * ks], da[2 * ks + 1]);
#pragma unroll
                for (int nt = 0; nt < D / 8; nt += 2) {  // ∂V += Aᵀ ∂N
                    u32 bfr[4];
                    ldb2_kmajor(bfr, Nc, LDV, ks * 16, nt * 8);
                    mma16816(dva[nt], pf, bfr);
                    mma16816(dva[nt + 1], pf, bfr + 2);
                }
#pragma unroll
                for (int nt = 0; nt < D / 8; nt += 2) {  // ∂K += ∂Sᵀ Q
                    u32 bfr[4];
                    ldb2_kmajor(bfr, Qc, LDK, ks * 16, nt * 8);
                    mma16816(dka[nt], df, bfr);
                    mma16816(dka[nt + 1], df, bfr + 2);
                }
            }
        }
    }
    // every load of a row before any store (the compiler cannot move a load past a store to a
    // pointer that might alias it: a round trip per row piece); both rows at once at D = 32, one
    // at a time above (the second block an SM hides the second trip; both at once spill more)
    constexpr int RA = D >= 64 ? 1 : 2;
    int b = bh / H, h = bh % H;
    float kd[2] = {0.f, 0.f};
#pragma unroll
    for (int h0 = 0; h0 < 2; h0 += RA) {  // rows g and g + 8 of the warp's 16
        float2 c[RA][D / 8], vo[RA][D / 8], kv[RA][D / 8];
#pragma unroll
        for (int u = 0; u < RA; u++) {
            int row = min(row0 + g + 8 * (h0 + u), nk - 1);  // (rows ≥ nk: loaded, not stored)
            long tok = (long)bh * T + k0 + row, m = ((long)b * T + k0 + row) * H + h;
#pragma unroll
            for (int nt = 0; nt < D / 8; nt++) {
                int col = nt * 8 + 2 * t;
                c[u][nt] = *(const float2*)(dkt + tok * D + col);
                vo[u][nt] = *(const float2*)(dvp + tok * E + col);
                kv[u][nt] = *(const float2*)(k + m * D + col);
            }
        }
#pragma unroll
        for (int u = 0; u < RA; u++) {
            int hr = h0 + u, row = row0 + g + 8 * hr;
            if (row >= nk) continue;
            long m = ((long)b * T + k0 + row) * H + h;
            float ek = hr ? ek1 : ek0;
#pragma unroll
            for (int nt = 0; nt < D / 8; nt++) {
                int col = nt * 8 + 2 * t;
                float2 ki = make_float2(dka[nt][2 * hr], dka[nt][2 * hr + 1]);
                float2 vi = make_float2(dva[nt][2 * hr], dva[nt][2 * hr + 1]);
                *(float2*)(dk + m * D + col) = make_float2(ek * c[u][nt].x + ki.x, ek * c[u][nt].y + ki.y);
                *(float2*)(dv + m * D + col) = make_float2(vo[u][nt].x + vi.x, vo[u][nt].y + vi.y);
                kd[hr] += ek * kv[u][nt].x * c[u][nt].x + ek * kv[u][nt].y * c[u][nt].y;
            }
        }
    }
    if (!dGk) return;
    dg0 = quad_sum(dg0);
    dg1 = quad_sum(dg1);
    kd[0] = quad_sum(kd[0]);
    kd[1] = quad_sum(kd[1]);
    if (t == 0) {
        if (row0 + g < nk) dGk[(long)bh * T + kj0] = dg0 - 0.5f * kd[0] - ek0 * ek0 * kzk[0];
        if (row0 + g + 8 < nk) dGk[(long)bh * T + kj1] = dg1 - 0.5f * kd[1] - ek1 * ek1 * kzk[1];
    }
}

// ---------------------------------------------------------------------------------------------
// Intra-chunk backward, query side, then the chain rule of its queries: the model's
// ∂q = σ(e^{G/2} ∂q̃ + ∂qs) (dqt: the inter-chunk read's ∂q̃, f32 [BH][T][D]: the numerator's; the
// denominator's, 2∂Z·Zq̃ with Z from the chunk's slot of the forward states S, is formed here),
// and with gates ∂G_τ's query part ½ q̃·∂q̃ + ∂G_intra (dGq), q̃ from the model's f32 q (as k̃ in
// sp_intra_bwd_dkv). ∂A = ∂N Vᵀ + ∂Z (each query's ∂Z added to its row).
template <int D>
__device__ void sp_intra_bwd_dq(float* dq, float* dGq, const bf16* qs, const bf16* kr, const bf16* vp, const bf16* dN,
                                const float* dZ, const float* G, const float* q, const float* dqt, const bf16* S, int T,
                                int H, int L, float scale) {
    typedef Dims<D> Dm;
    constexpr int E = Dm::E, QB = 128, KT = 64, LDK = D + 8, LDV = E + 8;
    bf16* Qs = (bf16*)smem;        // [QB][LDK]
    bf16* Ns = Qs + QB * LDK;      // [QB][LDV]
    bf16* Ks = Ns + QB * LDV;      // two stages of [KT][LDK]
    bf16* Vs = Ks + 2 * KT * LDK;  // two stages of [KT][LDV]
    bf16* Zs = Vs + 2 * KT * LDV;  // [D][D + 8]
    float* Gk = (float*)(Zs + D * (D + 8));  // two stages of [KT], then [WARPS][KT] decay factors
    int tile = blockIdx.x, bh = blockIdx.y, ci = blockIdx.z;
    int c0 = ci * L, q0 = c0 + tile * QB;
    if (tile * QB >= L || q0 >= T) return;
    int nq = min(QB, T - q0);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, row0 = warp * 16;
    int kend = min(q0 + QB, T);
    TileStream<D> keys{Ks, Vs, Gk, Gk + 2 * KT, kr, vp, G, (long)bh * T, kend, T, KT, true};
    // the queries, their ∂N and Z, then the first key tile (landing under quad_form)
    load_rows_async(Qs, LDK, qs + ((long)bh * T + q0) * D, nq, QB, D);
    load_rows_async(Ns, LDV, dN + ((long)bh * T + q0) * E, nq, QB, E);
    load_z_async<D>(Zs, S, bh, ci, gridDim.z);
    cp_async_commit();
    keys.issue(c0, 0);
    cp_async_wait_prev();
    __syncthreads();
    int qi0 = q0 + row0 + g, qi1 = qi0 + 8;
    float Gq0 = qi0 < T ? G[(long)bh * T + qi0] : 0.f, Gq1 = qi1 < T ? G[(long)bh * T + qi1] : 0.f;
    float dz0 = qi0 < T ? dZ[(long)bh * T + qi0] : 0.f, dz1 = qi1 < T ? dZ[(long)bh * T + qi1] : 0.f;
    // the denominator's part, in qs's coordinates: σ e^{G/2}·2∂Z·Zq̃ = σ·2∂Z e^{G}·Zqs starts ∂Q's
    // accumulator; q̃·(its ∂q̃) = 2∂Z e^{G}·qsᵀZqs (qzq, to the gates' query part below)
    float dqa[D / 8][4], dg0 = 0.f, dg1 = 0.f, qzq[2];
    quad_form<D>(dqa, qzq, Qs, LDK, row0, Zs);
    float zw0 = 2.f * dz0 * expf(Gq0), zw1 = 2.f * dz1 * expf(Gq1);
#pragma unroll
    for (int nt = 0; nt < D / 8; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) dqa[nt][i] *= i >= 2 ? zw1 : zw0;
    for (int k0 = c0, it = 0; k0 < kend; k0 += KT, it++) {
        int st = keys.advance(k0, it);
        const bf16 *Kc = keys.a_tile(st), *Vc = keys.b_tile(st);
        const float* Gc = keys.g_tile(st);
        if (k0 <= q0 + row0 + 15) {  // else every key comes after every query of this warp
            float s[KT / 8][4], da[KT / 8][4];
#pragma unroll
            for (int nt = 0; nt < KT / 8; nt++)
#pragma unroll
                for (int i = 0; i < 4; i++) s[nt][i] = da[nt][i] = 0.f;
            mma_rows<D, KT / 8>(s, Qs, LDK, row0, Kc, LDK);  // S = Q Kᵀ
            mma_rows<E, KT / 8>(da, Ns, LDV, row0, Vc, LDV);  // ∂A = ∂N Vᵀ + ∂Z
#pragma unroll
            for (int nt = 0; nt < KT / 8; nt++)
#pragma unroll
                for (int i = 0; i < 4; i++) da[nt][i] += i >= 2 ? dz1 : dz0;
            if (k0 + KT - 1 <= q0 + row0) {  // every key of the tile precedes every query of this warp
                const float* Fc = keys.decay(k0, st);
                float gref = Gc[min(KT, T - k0) - 1];
                float a0 = qi0 < T ? expf(Gq0 - gref) : 0.f, a1 = qi1 < T ? expf(Gq1 - gref) : 0.f;
                weigh_tile<KT / 8, false, 1>(s, da, Fc, a0, a1, dg0, dg1);
            } else {
#pragma unroll
                for (int nt = 0; nt < KT / 8; nt++)
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        int qi = i >= 2 ? qi1 : qi0, kj = k0 + nt * 8 + 2 * t + (i & 1);
                        float ds = 0.f;
                        if (kj <= qi && kj < T && qi < T) {
                            float u = s[nt][i], wgt = expf((i >= 2 ? Gq1 : Gq0) - Gc[kj - k0]);
                            float a = u * u * wgt;
                            ds = da[nt][i] * 2.f * u * wgt;
                            if (i >= 2) dg1 += da[nt][i] * a; else dg0 += da[nt][i] * a;
                        }
                        da[nt][i] = ds;
                    }
            }
#pragma unroll
            for (int ks = 0; ks < KT / 16; ks++) {  // ∂Q += ∂S K
                u32 df[4];
                acc_to_a(df, da[2 * ks], da[2 * ks + 1]);
#pragma unroll
                for (int nt = 0; nt < D / 8; nt += 2) {
                    u32 bfr[4];
                    ldb2_kmajor(bfr, Kc, LDK, ks * 16, nt * 8);
                    mma16816(dqa[nt], df, bfr);
                    mma16816(dqa[nt + 1], df, bfr + 2);
                }
            }
        }
    }
    // every load before any store (as in sp_intra_bwd_dkv)
    int b = bh / H, h = bh % H;
    float qd[2] = {0.f, 0.f};
    float2 a[2][D / 8], qv[2][D / 8];
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {  // rows g and g + 8 of the warp's 16
        int row = min(row0 + g + 8 * hr, nq - 1);  // (rows ≥ nq: loaded, not stored)
        long tok = (long)bh * T + q0 + row, m = ((long)b * T + q0 + row) * H + h;
#pragma unroll
        for (int nt = 0; nt < D / 8; nt++) {
            a[hr][nt] = *(const float2*)(dqt + tok * D + nt * 8 + 2 * t);
            qv[hr][nt] = *(const float2*)(q + m * D + nt * 8 + 2 * t);
        }
    }
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        int row = row0 + g + 8 * hr;
        if (row >= nq) continue;
        long m = ((long)b * T + q0 + row) * H + h;
        float eq = scale * expf(0.5f * (hr ? Gq1 : Gq0));
#pragma unroll
        for (int nt = 0; nt < D / 8; nt++) {
            int col = nt * 8 + 2 * t;
            float2 ai = make_float2(dqa[nt][2 * hr], dqa[nt][2 * hr + 1]);
            *(float2*)(dq + m * D + col) = make_float2(eq * a[hr][nt].x + scale * ai.x, eq * a[hr][nt].y + scale * ai.y);
            qd[hr] += eq * qv[hr][nt].x * a[hr][nt].x + eq * qv[hr][nt].y * a[hr][nt].y;
        }
    }
    if (!dGq) return;
    dg0 = quad_sum(dg0) + 0.5f * quad_sum(qd[0]) + 0.5f * zw0 * qzq[0];
    dg1 = quad_sum(dg1) + 0.5f * quad_sum(qd[1]) + 0.5f * zw1 * qzq[1];
    if (t == 0) {
        if (row0 + g < nq) dGq[(long)bh * T + qi0] = dg0;
        if (row0 + g + 8 < nq) dGq[(long)bh * T + qi1] = dg1;
    }
}

// The log-gates' gradient. A pair (key s, query t ≥ s) is weighted by e^{g_{s+1} + … + g_t},
// whether through the chunk-local cumulative gates G (s and t in one chunk) or through k̃'s
// factor, the states' decays and q̃'s factor (different chunks). So ∂g_r is the sum of the pairs' terms ⟨∂L/∂weight, weight⟩ over the
// pairs with s < r ≤ t — Σ_{τ ≥ r} ∂G_τ over the whole sequence, where ∂G_τ = (τ's terms as a
// query) − (τ's terms as a key) = dGq_τ + dGk_τ, which the intra-chunk kernels write (the
// inter-chunk terms by Euler's identity for φ of degree 2: ½ q̃·∂q̃ and ½ k̃·∂k̃). No inner
// product with the forward states is needed. The CPU's quadratic form takes its gates' gradient
// the same way (quadratic.rs, reverse_cumsum), as does fla.
// Two launches, one warp per (bh, chunk) each: the chunks' sums of ∂G, then each token's suffix
// (every lane a contiguous segment; in a fixed order, so the result is the same on every run).
extern "C" __global__ void sp_gate_chunk_sums(float* sums, const float* dGq, const float* dGk, int T, int L) {
    int bh = blockIdx.x, ci = blockIdx.y, NC = gridDim.y, lane = threadIdx.x;
    int t0 = ci * L, n = min(L, T - t0);
    long c0 = (long)bh * T + t0;
    float s = 0.f;
    for (int i = lane; i < n; i += 32) s += dGq[c0 + i] + dGk[c0 + i];
    s = warp_sum(s);
    if (lane == 0) sums[bh * NC + ci] = s;
}
extern "C" __global__ void sp_bwd_gates(float* dg, const float* dGq, const float* dGk, const float* sums, int T, int H,
                                        int L) {
    int bh = blockIdx.x, ci = blockIdx.y, NC = gridDim.y, b = bh / H, h = bh % H, lane = threadIdx.x;
    int t0 = ci * L, n = min(L, T - t0);
    long c0 = (long)bh * T + t0;
    float later = 0.f;  // the later chunks' ∂G
    for (int i = ci + 1 + lane; i < NC; i += 32) later += sums[bh * NC + i];
    later = warp_sum(later);
    int per = (n + 31) / 32, s0 = min(lane * per, n), s1 = min(s0 + per, n);
    float seg = 0.f;
    for (int s = s0; s < s1; s++) seg += dGq[c0 + s] + dGk[c0 + s];
    float suf = seg;  // inclusive suffix over lanes
    for (int o = 1; o < 32; o <<= 1) {
        float y = __shfl_down_sync(FULL, suf, o);
        if (lane + o < 32) suf += y;
    }
    float run = suf - seg + later;
    for (int s = s1 - 1; s >= s0; s--) {
        run += dGq[c0 + s] + dGk[c0 + s];
        dg[(long)(b * T + t0 + s) * H + h] = run;
    }
}

// ---------------------------------------------------------------------------------------------
// On Hopper the chunk states and the r-only and dx-only reads run on wgmma, and the host forms
// r and dx together as those two passes: each streams S once, but by bulk copies, and the two
// take 1.41 ms at T = 4k against the single mma.sync pass's 1.73 (PERFORMANCE.md; before the
// bulk copies the two passes were the slower, 1.78 against 1.72). sp_read_rdx is mma.sync's.
#if SP_WGMMA
#define SP_STATES sp_chunk_states_wg
#define SP_READ sp_read_wg
template <int D>
__device__ void sp_read_rdx(float*, float*, const bf16*, const bf16*, const bf16*, int, int, int) {
    __trap();  // never launched: the host runs sp_read_r and sp_read_dx (chunked.rs, read)
}
template <int D>
__device__ void sp_read_dx(float* r, float* dx, const bf16* x, const bf16* S, const bf16* w, int T, int L, int NC,
                            const GatherMaps* maps) {
    sp_read_wg<D, false, true>(r, dx, x, S, w, T, L, NC, maps);
}
#else
#define SP_STATES sp_chunk_states
#define SP_READ sp_read
template <int D>
__device__ void sp_read_rdx(float* r, float* dx, const bf16* x, const bf16* S, const bf16* w, int T, int L, int NC) {
    sp_read<D, true, true>(r, dx, x, S, w, T, L, NC);
}
template <int D>
__device__ void sp_read_dx(float* r, float* dx, const bf16* x, const bf16* S, const bf16* w, int T, int L, int NC,
                            const GatherMaps*) {
    sp_read<D, false, true>(r, dx, x, S, w, T, L, NC);  // full states: nothing to gather
}
#endif
// The chunk whose state is zero — the first in the cumsum's order: S_0 (forward, and the
// backward's ∂q read), R_{NC−1} (the backward's ∂k∂v read) — has nothing to read: its blocks
// write zeros (1/8 of the reads' work at T = 4k, chunk 512). Likewise the last chunk's
// contribution in that order is never summed into a state, so sp_chunk_states skips it.
template <int D> __device__ bool read_of_zero_state(float* r, float* dx, int T, int L, int zero_ci) {
    if ((int)blockIdx.z != zero_ci) return false;
    constexpr int QT = Smem<D>::read_qt, E = Dims<D>::E;
    int tile = blockIdx.x, bh = blockIdx.y, t0 = blockIdx.z * L + tile * QT;
    if (tile * QT >= L || t0 >= T) return true;
    int nv = min(min(QT, L - tile * QT), T - t0);
    const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
    if (r)
        for (int i = threadIdx.x; i < nv * E / 4; i += blockDim.x) ((float4*)(r + ((long)bh * T + t0) * E))[i] = z;
    if (dx)
        for (int i = threadIdx.x; i < nv * D / 4; i += blockDim.x) ((float4*)(dx + ((long)bh * T + t0) * D))[i] = z;
    return true;
}
// The intra-chunk backward kernels are held to 128 registers at D ≤ 64 so that two blocks share
// an SM: with one, nothing hid their mma.sync latencies (∂k∂v: 0.85 → 0.64 ms at T = 4k, against
// 28–76 bytes of spills; ∂q with its tile decay factors: 0.57 → 0.44 ms, against 40/72 bytes).
#define SP_INSTANCES(D)                                                                                               \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                             \
        sp_prep_##D(bf16* qs, bf16* kr, bf16* qt, bf16* kt, bf16* vp, float* Gout, float* Gam, const float* q,         \
                    const float* k, const float* v, const float* g, int T, int H, int L, float scale) {               \
        sp_prep<D>(qs, kr, qt, kt, vp, Gout, Gam, q, k, v, g, T, H, L, scale);                                        \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                             \
        sp_chunk_states_##D(bf16* out, const bf16* x, const bf16* y, int T, int L, int skip_ci) {                      \
        SP_STATES<D>(out, x, y, T, L, (int)blockIdx.z == skip_ci);                                                    \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                             \
        sp_chunk_gram_##D(bf16* out, const bf16* x, const float* w, int T, int L, int skip_ci) {                       \
        sp_chunk_gram<D>(out, x, w, T, L, (int)blockIdx.z == skip_ci);                                                \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                             \
        sp_read_r_##D(float* r, float* dx, const bf16* x, const bf16* S, const bf16* w, int T, int L, int NC,         \
                      int zero_ci) {                                                                                  \
        if (!read_of_zero_state<D>(r, dx, T, L, zero_ci)) SP_READ<D, true, false>(r, dx, x, S, w, T, L, NC);         \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                             \
        sp_read_dx_##D(float* r, float* dx, const bf16* x, const bf16* S, const bf16* w, int T, int L, int NC,        \
                       int zero_ci, const __grid_constant__ GatherMaps maps) {                                        \
        if (!read_of_zero_state<D>(r, dx, T, L, zero_ci)) sp_read_dx<D>(r, dx, x, S, w, T, L, NC, &maps);            \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                             \
        sp_read_rdx_##D(float* r, float* dx, const bf16* x, const bf16* S, const bf16* w, int T, int L, int NC,       \
                        int zero_ci) {                                                                                \
        if (!read_of_zero_state<D>(r, dx, T, L, zero_ci)) sp_read_rdx<D>(r, dx, x, S, w, T, L, NC);                   \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                             \
        sp_intra_fwd_##D(float* y, float* log_norm, const bf16* qs, const bf16* kr, const bf16* vp, const float* G,   \
                         const float* inter, const bf16* S, int T, int H, int L, float eps) {                         \
        sp_intra_fwd<D>(y, log_norm, qs, kr, vp, G, inter, S, T, H, L, eps);                                          \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                             \
        sp_bwd_prep_##D(bf16* dN, float* dZ, const float* dy, const float* y, const float* log_norm, int B, int T,   \
                        int H) {                                                                                      \
        sp_bwd_prep<D>(dN, dZ, dy, y, log_norm, B, T, H);                                                             \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS, (D) <= 64 ? 2 : 1)                                          \
        sp_intra_bwd_dkv_##D(float* dk, float* dv, float* dGk, const bf16* qs, const bf16* kr, const bf16* vp,       \
                             const bf16* dN, const float* dZ, const float* G, const float* Gam, const float* k,       \
                             const float* dkt, const float* dvp, const bf16* R, int T, int H, int L) {                \
        sp_intra_bwd_dkv<D>(dk, dv, dGk, qs, kr, vp, dN, dZ, G, Gam, k, dkt, dvp, R, T, H, L);                         \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS, (D) <= 64 ? 2 : 1)                                          \
        sp_intra_bwd_dq_##D(float* dq, float* dGq, const bf16* qs, const bf16* kr, const bf16* vp, const bf16* dN,    \
                            const float* dZ, const float* G, const float* q, const float* dqt, const bf16* S, int T,  \
                            int H, int L, float scale) {                                                              \
        sp_intra_bwd_dq<D>(dq, dGq, qs, kr, vp, dN, dZ, G, q, dqt, S, T, H, L, scale);                                \
    }

SP_INSTANCES(32)
SP_INSTANCES(64)
SP_INSTANCES(128)

extern "C" __global__ void __launch_bounds__(THREADS)
    sp_discumsum_all(bf16* st, const float* Gam, long per_chunk, int NC, int reverse) {
    sp_discumsum(st, Gam, per_chunk, NC, reverse);
}

// Shared-memory bytes of each kernel, per head dimension, in the order the host reads them
// (SMEM_ENTRIES ints for D = 32, then 64, then 128): prep, states, read_r, read_dx, read_rdx,
// intra_fwd, dkv, dq; then tokens per sp_read block, sp_chunk_states blocks per chunk, whether
// the state products run on wgmma, and rows (E wide) of a chunk's slot (its state, then Z).
#define SMEM_ENTRIES 12
template <int D> __device__ void smem_sizes(int* o) {
    typedef Smem<D> S;
    int v[SMEM_ENTRIES] = {S::prep, S::states,  S::wg_read_r, S::wg_read_dx, S::read_rdx, S::intra_fwd,
                           S::dkv,  S::dq,      S::read_qt,   S::states_blocks, SP_WGMMA, S::slot_rows};
    for (int i = 0; i < SMEM_ENTRIES; i++) o[i] = v[i];
}
extern "C" __global__ void sp_smem_sizes(int* out) {
    smem_sizes<32>(out);
    smem_sizes<64>(out + SMEM_ENTRIES);
    smem_sizes<128>(out + 2 * SMEM_ENTRIES);
}
