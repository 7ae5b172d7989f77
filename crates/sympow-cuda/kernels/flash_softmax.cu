// Causal softmax attention (the baseline), flash-style on tensor cores: the scores never leave
// the chip. The GPU twin of the quadratic form in crates/sympow/src/attention/quadratic.rs for
// ungated softmax with ε = 0, head dimension D = dk = dv ∈ {32, 64, 128}.
//
// A block is 4 warps and a tile of 64 rows (queries in the forward and the ∂q pass, keys in the
// ∂k∂v pass); each warp owns 16 of them and walks the other side 64 at a time, the next tile
// streaming into shared memory (cp.async, double-buffered) while this one is multiplied.
// flash_stage first copies q (×σ), k, v (and ∂y) from the model's f32 [B, T, H, D] into bf16
// [B, H, T, D], so each tile is one contiguous block; every product is mma.sync m16n8k16 with
// f32 accumulation.
//   flash_fwd       online softmax over key tiles: y, and the log-sum-exp of each row
//   flash_bwd_delta Δ_t = ∂y_t·y_t
//   flash_bwd_dq    per query tile, recomputing P from the log-sum-exp: ∂q = σ Σ_s ∂S_ts k_s
//   flash_bwd_dkv   per key tile: ∂v = Pᵀ∂y, ∂k = ∂Sᵀ(σq), with ∂S = P ∘ (∂y vᵀ − Δ)
// Two backward passes instead of FlashAttention-2's atomics: deterministic, at the price of
// computing S and ∂P twice.

#define FT 64             // rows per block tile, and columns per step
#define FTHREADS 128      // 4 warps × 16 rows
#define NEG_INF __int_as_float(0xff800000)

template <int D> struct Flash {
    static constexpr int LD = D + 8;  // bf16 row stride in shared memory (16-byte rows, fewer conflicts)
    static constexpr int TILE = FT * LD;
    static constexpr int fwd = 5 * TILE * 2;                 // Q, 2 × (K, V)
    static constexpr int dq = 6 * TILE * 2;                  // Q, ∂Y, 2 × (K, V)
    static constexpr int dkv = 6 * TILE * 2 + 4 * FT * 4;    // K, V, 2 × (Q, ∂Y, lse, Δ)
};

// out [B, H, T, D] bf16 = mul · x [B, T, H, D] f32, 8 elements a thread
extern "C" __global__ void flash_stage(bf16* out, const float* x, int T, int H, int D, long n8, float mul) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= n8) return;
    int v8 = D / 8, c = (i % v8) * 8;
    long row = i / v8;  // (b·T + t)·H + h
    int h = row % H;
    long bt = row / H;
    int t = bt % T, b = bt / T;
    const float4* src = (const float4*)(x + row * D + c);
    float4 u = src[0], w = src[1];
    uint4 o = make_uint4(pack2(u.x * mul, u.y * mul), pack2(u.z * mul, u.w * mul), pack2(w.x * mul, w.y * mul),
                         pack2(w.z * mul, w.w * mul));
    *(uint4*)(out + (((long)b * H + h) * T + t) * D + c) = o;
}

// start the copy of rows t0..t0+64 of one head's staged [T, D] into the shared tile s
template <int D> __device__ __forceinline__ void fetch(bf16* s, const bf16* head, int t0, int T) {
    load_rows_async(s, Flash<D>::LD, head + (long)t0 * D, min(FT, T - t0), FT, D);
}

// In an m16n8 accumulator tile nt, element i sits at row g + 8·(i/2), column nt·8 + 2t + i%2.
__device__ __forceinline__ int acc_row(int i) { return ((threadIdx.x & 31) >> 2) + (i >> 1) * 8; }
__device__ __forceinline__ int acc_col(int nt, int i) { return nt * 8 + 2 * (threadIdx.x & 3) + (i & 1); }

// acc[D/8] += A·B with A the 16×64 probabilities/gradients held as 8 accumulator tiles and B
// the 64×D tile s stored k-major (s[k * LD + n]): the P·V / dS·K / Pᵀ·dY products.
template <int D> __device__ __forceinline__ void mma_acc_kmajor(float (*acc)[4], float (*p)[4], const bf16* s) {
    constexpr int LD = Flash<D>::LD;
#pragma unroll
    for (int kk = 0; kk < FT / 16; kk++) {
        u32 a[4];
        acc_to_a(a, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
        for (int dt = 0; dt < D / 8; dt += 2) {
            u32 b[4];
            ldb2_kmajor(b, s, LD, kk * 16, dt * 8);
            mma16816(acc[dt], a, b);
            mma16816(acc[dt + 1], a, b + 2);
        }
    }
}

// The A fragments of a warp's 16 rows of a [64, D] tile, kept in registers across the loop.
template <int D> __device__ __forceinline__ void load_rows_frags(u32 (*af)[4], const bf16* s, int row0) {
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) lda(af[kk], s, Flash<D>::LD, row0, kk * 16);
}

// acc[0..8) = A·Bᵀ for A in fragments (16 × D) and B a [64, D] tile (64 columns)
template <int D> __device__ __forceinline__ void mma_frags(float (*acc)[4], const u32 (*af)[4], const bf16* b) {
#pragma unroll
    for (int i = 0; i < 8; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
#pragma unroll
        for (int nt = 0; nt < 8; nt += 2) {
            u32 bf[4];
            ldb2_nmajor(bf, b, Flash<D>::LD, nt * 8, kk * 16);
            mma16816(acc[nt], af[kk], bf);
            mma16816(acc[nt + 1], af[kk], bf + 2);
        }
    }
}

template <int D>
__device__ void flash_fwd(float* y, float* lse, const bf16* qs, const bf16* ks, const bf16* vs, int T, int H) {
    constexpr int TILE = Flash<D>::TILE;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16 *Qs = (bf16*)smem, *Kb = Qs + TILE, *Vb = Kb + 2 * TILE;
    int bh = blockIdx.y, b = bh / H, h = bh % H, q0 = blockIdx.x * FT;
    int warp = threadIdx.x >> 5, row0 = warp * 16;
    long head = (long)bh * T * D;
    int ntiles = (min(T, q0 + FT) + FT - 1) / FT;  // causal: keys up to the last query
    fetch<D>(Qs, qs + head, q0, T);
    fetch<D>(Kb, ks + head, 0, T);
    fetch<D>(Vb, vs + head, 0, T);
    cp_async_commit();
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f}, o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    u32 qf[D / 16][4];
    for (int it = 0; it < ntiles; it++) {
        int k0 = it * FT;
        if (it + 1 < ntiles) {
            fetch<D>(Kb + ((it + 1) & 1) * TILE, ks + head, k0 + FT, T);
            fetch<D>(Vb + ((it + 1) & 1) * TILE, vs + head, k0 + FT, T);
        }
        cp_async_commit();
        cp_async_wait_prev();
        __syncthreads();
        const bf16 *Ks = Kb + (it & 1) * TILE, *Vs = Vb + (it & 1) * TILE;
        if (it == 0) load_rows_frags<D>(qf, Qs, row0);
        float s[8][4];
        mma_frags<D>(s, qf, Ks);
        float mx[2] = {m[0], m[1]};
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int kq = k0 + acc_col(nt, i), qi = q0 + row0 + acc_row(i);
                if (kq > qi || kq >= T) s[nt][i] = NEG_INF;
                mx[i >> 1] = fmaxf(mx[i >> 1], s[nt][i]);
            }
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            float alpha = mx[r] == NEG_INF ? 1.f : __expf(m[r] - mx[r]);
            l[r] *= alpha;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) { o[dt][2 * r] *= alpha; o[dt][2 * r + 1] *= alpha; }
            m[r] = mx[r];
        }
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float p = s[nt][i] == NEG_INF ? 0.f : __expf(s[nt][i] - m[i >> 1]);
                s[nt][i] = p;
                l[i >> 1] += p;
            }
        }
        mma_acc_kmajor<D>(o, s, Vs);
        __syncthreads();  // the next iteration's prefetch overwrites this buffer
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        int qi = q0 + row0 + acc_row(2 * r);
        if (qi >= T) continue;
        long base = ((long)(b * T + qi) * H + h) * D;
        float inv = 1.f / l[r];
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            int c = acc_col(dt, 0);
            *(float2*)(y + base + c) = make_float2(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
        }
        if ((threadIdx.x & 3) == 0) lse[(long)(b * T + qi) * H + h] = m[r] + logf(l[r]);
    }
}

// Δ for every row of [B, T, H, D]
extern "C" __global__ void flash_bwd_delta(float* delta, const float* dy, const float* y, long rows, int D) {
    long r = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (r >= rows) return;
    float s = 0.f;
    for (int c = 0; c < D; c++) s += dy[r * D + c] * y[r * D + c];
    delta[r] = s;
}

template <int D>
__device__ void flash_bwd_dq(float* dq, const bf16* qs, const bf16* ks, const bf16* vs, const bf16* dys,
                             const float* lse, const float* delta, int T, int H, float scale) {
    constexpr int TILE = Flash<D>::TILE;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16 *Qs = (bf16*)smem, *dYs = Qs + TILE, *Kb = dYs + TILE, *Vb = Kb + 2 * TILE;
    int bh = blockIdx.y, b = bh / H, h = bh % H, q0 = blockIdx.x * FT;
    int warp = threadIdx.x >> 5, row0 = warp * 16;
    long head = (long)bh * T * D;
    int ntiles = (min(T, q0 + FT) + FT - 1) / FT;
    fetch<D>(Qs, qs + head, q0, T);
    fetch<D>(dYs, dys + head, q0, T);
    fetch<D>(Kb, ks + head, 0, T);
    fetch<D>(Vb, vs + head, 0, T);
    cp_async_commit();
    float L[2], Dl[2], acc[D / 8][4];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int qi = q0 + row0 + acc_row(2 * r);
        L[r] = qi < T ? lse[(long)(b * T + qi) * H + h] : 0.f;
        Dl[r] = qi < T ? delta[(long)(b * T + qi) * H + h] : 0.f;
    }
#pragma unroll
    for (int i = 0; i < D / 8; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    u32 qf[D / 16][4], yf[D / 16][4];
    for (int it = 0; it < ntiles; it++) {
        int k0 = it * FT;
        if (it + 1 < ntiles) {
            fetch<D>(Kb + ((it + 1) & 1) * TILE, ks + head, k0 + FT, T);
            fetch<D>(Vb + ((it + 1) & 1) * TILE, vs + head, k0 + FT, T);
        }
        cp_async_commit();
        cp_async_wait_prev();
        __syncthreads();
        const bf16 *Ks = Kb + (it & 1) * TILE, *Vs = Vb + (it & 1) * TILE;
        if (it == 0) {
            load_rows_frags<D>(qf, Qs, row0);
            load_rows_frags<D>(yf, dYs, row0);
        }
        float s[8][4], dp[8][4];
        mma_frags<D>(s, qf, Ks);
        mma_frags<D>(dp, yf, Vs);
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int kq = k0 + acc_col(nt, i), qi = q0 + row0 + acc_row(i);
                float p = (kq > qi || kq >= T || qi >= T) ? 0.f : __expf(s[nt][i] - L[i >> 1]);
                s[nt][i] = p * (dp[nt][i] - Dl[i >> 1]);  // ∂S
            }
        }
        mma_acc_kmajor<D>(acc, s, Ks);
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int qi = q0 + row0 + acc_row(2 * r);
        if (qi >= T) continue;
        long base = ((long)(b * T + qi) * H + h) * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++)
            *(float2*)(dq + base + acc_col(dt, 0)) = make_float2(acc[dt][2 * r] * scale, acc[dt][2 * r + 1] * scale);
    }
}

template <int D>
__device__ void flash_bwd_dkv(float* dk, float* dv, const bf16* qs, const bf16* ks, const bf16* vs, const bf16* dys,
                              const float* lse, const float* delta, int T, int H) {
    constexpr int TILE = Flash<D>::TILE;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16 *Ks = (bf16*)smem, *Vs = Ks + TILE, *Qb = Vs + TILE, *dYb = Qb + 2 * TILE;
    float* Lb = (float*)(dYb + 2 * TILE);  // 2 × (lse, Δ) of FT rows
    int bh = blockIdx.y, b = bh / H, h = bh % H, k0 = blockIdx.x * FT;
    int warp = threadIdx.x >> 5, row0 = warp * 16;
    long head = (long)bh * T * D;
    fetch<D>(Ks, ks + head, k0, T);
    fetch<D>(Vs, vs + head, k0, T);
    auto fetch_queries = [&](int q0, int buf) {
        fetch<D>(Qb + buf * TILE, qs + head, q0, T);
        fetch<D>(dYb + buf * TILE, dys + head, q0, T);
        for (int i = threadIdx.x; i < FT; i += FTHREADS) {
            int qi = q0 + i;
            Lb[buf * 2 * FT + i] = qi < T ? lse[(long)(b * T + qi) * H + h] : 0.f;
            Lb[buf * 2 * FT + FT + i] = qi < T ? delta[(long)(b * T + qi) * H + h] : 0.f;
        }
    };
    fetch_queries(k0, 0);
    cp_async_commit();
    float ak[D / 8][4], av[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) {
#pragma unroll
        for (int j = 0; j < 4; j++) ak[i][j] = av[i][j] = 0.f;
    }
    u32 kf[D / 16][4], vf[D / 16][4];
    for (int q0 = k0, it = 0; q0 < T; q0 += FT, it++) {
        if (q0 + FT < T) fetch_queries(q0 + FT, (it + 1) & 1);
        cp_async_commit();
        cp_async_wait_prev();
        __syncthreads();
        const bf16 *Qs = Qb + (it & 1) * TILE, *dYs = dYb + (it & 1) * TILE;
        const float *Ls = Lb + (it & 1) * 2 * FT, *Dls = Ls + FT;
        if (it == 0) {
            load_rows_frags<D>(kf, Ks, row0);
            load_rows_frags<D>(vf, Vs, row0);
        }
        float st[8][4], dpt[8][4];  // Sᵀ and ∂Pᵀ: rows are this warp's keys, columns queries
        mma_frags<D>(st, kf, Qs);
        mma_frags<D>(dpt, vf, dYs);
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int c = acc_col(nt, i), qi = q0 + c, kq = k0 + row0 + acc_row(i);
                float p = (kq > qi || qi >= T || kq >= T) ? 0.f : __expf(st[nt][i] - Ls[c]);
                st[nt][i] = p;
                dpt[nt][i] = p * (dpt[nt][i] - Dls[c]);  // ∂Sᵀ
            }
        }
        mma_acc_kmajor<D>(av, st, dYs);
        mma_acc_kmajor<D>(ak, dpt, Qs);
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int kq = k0 + row0 + acc_row(2 * r);
        if (kq >= T) continue;
        long base = ((long)(b * T + kq) * H + h) * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            int c = acc_col(dt, 0);
            *(float2*)(dk + base + c) = make_float2(ak[dt][2 * r], ak[dt][2 * r + 1]);
            *(float2*)(dv + base + c) = make_float2(av[dt][2 * r], av[dt][2 * r + 1]);
        }
    }
}

#define FLASH_INSTANCES(D)                                                                                     \
    extern "C" __global__ void __launch_bounds__(FTHREADS)                                                     \
        flash_fwd_##D(float* y, float* lse, const bf16* qs, const bf16* ks, const bf16* vs, int T, int H) {    \
        flash_fwd<D>(y, lse, qs, ks, vs, T, H);                                                                \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(FTHREADS)                                                     \
        flash_bwd_dq_##D(float* dq, const bf16* qs, const bf16* ks, const bf16* vs, const bf16* dys,            \
                         const float* lse, const float* delta, int T, int H, float scale) {                    \
        flash_bwd_dq<D>(dq, qs, ks, vs, dys, lse, delta, T, H, scale);                                         \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(FTHREADS)                                                     \
        flash_bwd_dkv_##D(float* dk, float* dv, const bf16* qs, const bf16* ks, const bf16* vs,                 \
                          const bf16* dys, const float* lse, const float* delta, int T, int H) {               \
        flash_bwd_dkv<D>(dk, dv, qs, ks, vs, dys, lse, delta, T, H);                                           \
    }

FLASH_INSTANCES(32)
FLASH_INSTANCES(64)
FLASH_INSTANCES(128)

// Shared-memory bytes of fwd, dq, dkv for D = 32, 64, 128 (9 ints), read by the host.
extern "C" __global__ void flash_smem_sizes(int* o) {
    o[0] = Flash<32>::fwd; o[1] = Flash<32>::dq; o[2] = Flash<32>::dkv;
    o[3] = Flash<64>::fwd; o[4] = Flash<64>::dq; o[5] = Flash<64>::dkv;
    o[6] = Flash<128>::fwd; o[7] = Flash<128>::dq; o[8] = Flash<128>::dkv;
}
