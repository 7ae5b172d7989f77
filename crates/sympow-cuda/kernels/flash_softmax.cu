// Causal softmax attention (the baseline), flash-style on tensor cores: the scores never leave
// the chip. The GPU twin of the quadratic form in crates/sympow/src/attention/quadratic.rs for
// ungated softmax with ε = 0, head dimension D = dk = dv ∈ {32, 64, 128}.
//
// A block is 4 warps and a tile of rows (queries in the forward and the ∂q pass, keys in the
// ∂k∂v pass: 128 in the forward at D ≤ 64, else 64); each warp owns 16 or 32 of them and walks
// the other side 64 at a time, the next tile streaming into shared memory (cp.async,
// double-buffered) while this one is multiplied. Exponentials are base 2 with log₂e folded into
// one FMA a score, and only tiles that cross the diagonal (or T) are masked.
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
    // the forward's row tiles per warp (two at D ≤ 64; at 128 the accumulators would not fit)
    static constexpr int M = D <= 64 ? 2 : 1;
    static constexpr int QF = 64 * M;                        // queries per forward block
    static constexpr int fwd = (QF * LD + 4 * TILE) * 2;     // Q, 2 × (K, V)
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

// 2^x (ex2.approx.ftz: 2^−∞ = 0). The softmax's exponentials are taken in base 2 with log₂e folded
// into one FMA a score, p = 2^(s·log₂e − m·log₂e), where __expf(s − m) costs a subtraction, a
// multiply and the exp.
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
#define LOG2E 1.4426950408889634f

// A block of 4 warps takes QF = 64·M queries, each warp 16·M consecutive rows (M row tiles: each
// B fragment of K and V then feeds M products, and the warp has M independent chains of them)
// and walks the keys FT at a time. Only the tiles that cross a warp's diagonal (or T) are masked;
// a warp skips the tiles wholly after its rows (they are all masked). The query tiles with the
// most keys start first (blockIdx.x counts down from the last tile), so that the short ones fill
// in behind them rather than the long ones ending alone.
template <int D>
__device__ void flash_fwd(float* y, float* lse, const bf16* qs, const bf16* ks, const bf16* vs, int T, int H) {
    constexpr int M = Flash<D>::M, QF = Flash<D>::QF, LD = Flash<D>::LD, TILE = Flash<D>::TILE;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16 *Qs = (bf16*)smem, *Kb = Qs + QF * LD, *Vb = Kb + 2 * TILE;
    int bh = blockIdx.y, b = bh / H, h = bh % H, q0 = (gridDim.x - 1 - blockIdx.x) * QF;
    int warp = threadIdx.x >> 5, row0 = warp * 16 * M;
    int first = q0 + row0, last = first + 16 * M - 1;  // this warp's query rows
    long head = (long)bh * T * D;
    int ntiles = (min(T, q0 + QF) + FT - 1) / FT;  // causal: keys up to the block's last query
    load_rows_async(Qs, LD, qs + head + (long)q0 * D, min(QF, T - q0), QF, D);
    fetch<D>(Kb, ks + head, 0, T);
    fetch<D>(Vb, vs + head, 0, T);
    cp_async_commit();
    // m: each row's running maximum (natural units), l: its running sum of 2^(…) (this thread's
    // columns; the quad's sum at the end)
    float m[M][2], l[M][2], o[M][D / 8][4];
#pragma unroll
    for (int mm = 0; mm < M; mm++) {
        m[mm][0] = m[mm][1] = NEG_INF;
        l[mm][0] = l[mm][1] = 0.f;
#pragma unroll
        for (int i = 0; i < D / 8; i++) o[mm][i][0] = o[mm][i][1] = o[mm][i][2] = o[mm][i][3] = 0.f;
    }
    u32 qf[M][D / 16][4];
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
        if (it == 0)
#pragma unroll
            for (int mm = 0; mm < M; mm++)
#pragma unroll
                for (int kk = 0; kk < D / 16; kk++) lda(qf[mm][kk], Qs, LD, row0 + 16 * mm, kk * 16);
        if (k0 <= last) {  // (warp-uniform) some key of the tile is visible to some row of the warp
            float s[M][8][4];
#pragma unroll
            for (int mm = 0; mm < M; mm++)
#pragma unroll
                for (int nt = 0; nt < 8; nt++) s[mm][nt][0] = s[mm][nt][1] = s[mm][nt][2] = s[mm][nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++)
#pragma unroll
                for (int nt = 0; nt < 8; nt += 2) {
                    u32 bf[4];
                    ldb2_nmajor(bf, Ks, LD, nt * 8, kk * 16);
#pragma unroll
                    for (int mm = 0; mm < M; mm++) {
                        mma16816(s[mm][nt], qf[mm][kk], bf);
                        mma16816(s[mm][nt + 1], qf[mm][kk], bf + 2);
                    }
                }
            bool masked = k0 + FT - 1 > first || k0 + FT > T;  // some pair of the tile is masked
#pragma unroll
            for (int mm = 0; mm < M; mm++) {
                float mx[2] = {m[mm][0], m[mm][1]};
#pragma unroll
                for (int nt = 0; nt < 8; nt++)
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        if (masked) {
                            int kq = k0 + acc_col(nt, i), qi = first + 16 * mm + acc_row(i);
                            if (kq > qi || kq >= T) s[mm][nt][i] = NEG_INF;
                        }
                        mx[i >> 1] = fmaxf(mx[i >> 1], s[mm][nt][i]);
                    }
                float ms[2];  // −max·log₂e: 2^(s·log₂e + ms) = e^(s − max)
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
                    // every row sees key 0 in the first tile: mx is finite from there on, and
                    // alpha = 2^−∞ = 0 against the first tile's m = −∞
                    float alpha = exp2_approx((m[mm][r] - mx[r]) * LOG2E);
                    l[mm][r] *= alpha;
#pragma unroll
                    for (int dt = 0; dt < D / 8; dt++) {
                        o[mm][dt][2 * r] *= alpha;
                        o[mm][dt][2 * r + 1] *= alpha;
                    }
                    m[mm][r] = mx[r];
                    ms[r] = -mx[r] * LOG2E;
                }
#pragma unroll
                for (int nt = 0; nt < 8; nt++)
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        float p = exp2_approx(fmaf(s[mm][nt][i], LOG2E, ms[i >> 1]));
                        s[mm][nt][i] = p;
                        l[mm][i >> 1] += p;
                    }
            }
            // O += P·V, each B fragment of V feeding the M row tiles
#pragma unroll
            for (int kk = 0; kk < FT / 16; kk++) {
                u32 a[M][4];
#pragma unroll
                for (int mm = 0; mm < M; mm++) acc_to_a(a[mm], s[mm][2 * kk], s[mm][2 * kk + 1]);
#pragma unroll
                for (int dt = 0; dt < D / 8; dt += 2) {
                    u32 bf[4];
                    ldb2_kmajor(bf, Vs, LD, kk * 16, dt * 8);
#pragma unroll
                    for (int mm = 0; mm < M; mm++) {
                        mma16816(o[mm][dt], a[mm], bf);
                        mma16816(o[mm][dt + 1], a[mm], bf + 2);
                    }
                }
            }
        }
        __syncthreads();  // the next iteration's prefetch overwrites this buffer
    }
#pragma unroll
    for (int mm = 0; mm < M; mm++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float sum = l[mm][r];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            int qi = first + 16 * mm + acc_row(2 * r);
            if (qi >= T) continue;
            long base = ((long)(b * T + qi) * H + h) * D;
            float inv = 1.f / sum;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++)
                *(float2*)(y + base + acc_col(dt, 0)) =
                    make_float2(o[mm][dt][2 * r] * inv, o[mm][dt][2 * r + 1] * inv);
            if ((threadIdx.x & 3) == 0) lse[(long)(b * T + qi) * H + h] = m[mm][r] + logf(sum);
        }
}

// Δ for every row of [B, T, H, D], a warp a row (its lanes over the row's D contiguous floats)
extern "C" __global__ void flash_bwd_delta(float* delta, const float* dy, const float* y, long rows, int D) {
    long r = (blockIdx.x * (long)blockDim.x + threadIdx.x) >> 5;
    if (r >= rows) return;
    int lane = threadIdx.x & 31;
    float s = 0.f;
    for (int c = lane; c < D; c += 32) s += dy[r * D + c] * y[r * D + c];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) delta[r] = s;
}

template <int D>
__device__ void flash_bwd_dq(float* dq, const bf16* qs, const bf16* ks, const bf16* vs, const bf16* dys,
                             const float* lse, const float* delta, int T, int H, float scale) {
    constexpr int TILE = Flash<D>::TILE;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16 *Qs = (bf16*)smem, *dYs = Qs + TILE, *Kb = dYs + TILE, *Vb = Kb + 2 * TILE;
    // the query tiles with the most keys first (as in the forward)
    int bh = blockIdx.y, b = bh / H, h = bh % H, q0 = (gridDim.x - 1 - blockIdx.x) * FT;
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
        // −lse·log₂e: P = 2^(s·log₂e − lse·log₂e)
        L[r] = qi < T ? -lse[(long)(b * T + qi) * H + h] * LOG2E : 0.f;
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
        bool masked = it == ntiles - 1;  // the diagonal tile (rows past T are never stored)
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float p = exp2_approx(fmaf(s[nt][i], LOG2E, L[i >> 1]));
                if (masked && (k0 + acc_col(nt, i) > q0 + row0 + acc_row(i) || k0 + acc_col(nt, i) >= T)) p = 0.f;
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
    float* Lb = (float*)(dYb + 2 * TILE);  // 2 × (−lse·log₂e, Δ) of FT rows
    // (the key tiles with the most queries, the first, start first in launch order)
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
            Lb[buf * 2 * FT + i] = qi < T ? -lse[(long)(b * T + qi) * H + h] * LOG2E : 0.f;  // −lse·log₂e
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
        // the diagonal tile, and queries past T (zero rows, whose p must not reach real keys)
        bool masked = q0 == k0 || q0 + FT > T;
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int c = acc_col(nt, i), qi = q0 + c, kq = k0 + row0 + acc_row(i);
                float p = exp2_approx(fmaf(st[nt][i], LOG2E, Ls[c]));
                if (masked && (kq > qi || qi >= T)) p = 0.f;
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

// Per head dimension D = 32, 64, 128: shared-memory bytes of fwd, dq, dkv, then the forward's
// queries per block (4 ints each, 12 in all), read by the host.
#define FLASH_SIZES(i, D) \
    o[4 * i] = Flash<D>::fwd, o[4 * i + 1] = Flash<D>::dq, o[4 * i + 2] = Flash<D>::dkv, o[4 * i + 3] = Flash<D>::QF
extern "C" __global__ void flash_smem_sizes(int* o) {
    FLASH_SIZES(0, 32);
    FLASH_SIZES(1, 64);
    FLASH_SIZES(2, 128);
}
