// Causal softmax attention (the baseline), flash-style on tensor cores: the scores never leave
// the chip. The GPU twin of the quadratic form in crates/sympow/src/attention/quadratic.rs for
// ungated softmax with ε = 0, head dimension D = dk = dv ∈ {32, 64, 128}.
//
// A block is 4 warps and a tile of 64 rows (queries in the forward and the ∂q pass, keys in the
// ∂k∂v pass); each warp owns 16 of them and walks the other side 64 at a time. q, k, v, ∂y are
// read as f32 from the model's [B, T, H, D] tensors and staged in shared memory as bf16 (σq
// pre-scaled); every product is mma.sync m16n8k16 with f32 accumulation.
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
    static constexpr int fwd = 3 * TILE * 2;
    static constexpr int dq = 4 * TILE * 2;
    static constexpr int dkv = 4 * TILE * 2 + 2 * FT * 4;
};

// rows t0..t0+64 of head (b, h) of x [B, T, H, D] → s (bf16, ×mul), zero rows beyond T
template <int D> __device__ __forceinline__ void stage(bf16* s, const float* x, int b, int h, int t0, int T, int H, float mul) {
    constexpr int LD = Flash<D>::LD, V = D / 4;
    for (int i = threadIdx.x; i < FT * V; i += FTHREADS) {
        int r = i / V, c = (i % V) * 4, t = t0 + r;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (t < T) v = *(const float4*)(x + ((long)(b * T + t) * H + h) * D + c);
        u32* d = (u32*)(s + r * LD + c);
        d[0] = pack2(v.x * mul, v.y * mul);
        d[1] = pack2(v.z * mul, v.w * mul);
    }
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

template <int D>
__device__ void flash_fwd(float* y, float* lse, const float* q, const float* k, const float* v, int T, int H, float scale) {
    constexpr int LD = Flash<D>::LD, TILE = Flash<D>::TILE;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16 *Qs = (bf16*)smem, *Ks = Qs + TILE, *Vs = Ks + TILE;
    int bh = blockIdx.y, b = bh / H, h = bh % H, q0 = blockIdx.x * FT;
    int warp = threadIdx.x >> 5, row0 = warp * 16;
    stage<D>(Qs, q, b, h, q0, T, H, scale);
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f}, o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    int kend = min(T, q0 + FT);
    for (int k0 = 0; k0 < kend; k0 += FT) {
        __syncthreads();
        stage<D>(Ks, k, b, h, k0, T, H, 1.f);
        stage<D>(Vs, v, b, h, k0, T, H, 1.f);
        __syncthreads();
        float s[8][4];
#pragma unroll
        for (int i = 0; i < 8; i++) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
        mma_rows<D, 8>(s, Qs, LD, row0, Ks, LD);
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
__device__ void flash_bwd_dq(float* dq, const float* q, const float* k, const float* v, const float* dy,
                             const float* lse, const float* delta, int T, int H, float scale) {
    constexpr int LD = Flash<D>::LD, TILE = Flash<D>::TILE;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16 *Qs = (bf16*)smem, *dYs = Qs + TILE, *Ks = dYs + TILE, *Vs = Ks + TILE;
    int bh = blockIdx.y, b = bh / H, h = bh % H, q0 = blockIdx.x * FT;
    int warp = threadIdx.x >> 5, row0 = warp * 16;
    stage<D>(Qs, q, b, h, q0, T, H, scale);
    stage<D>(dYs, dy, b, h, q0, T, H, 1.f);
    float L[2], Dl[2], acc[D / 8][4];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int qi = q0 + row0 + acc_row(2 * r);
        L[r] = qi < T ? lse[(long)(b * T + qi) * H + h] : 0.f;
        Dl[r] = qi < T ? delta[(long)(b * T + qi) * H + h] : 0.f;
    }
#pragma unroll
    for (int i = 0; i < D / 8; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    int kend = min(T, q0 + FT);
    for (int k0 = 0; k0 < kend; k0 += FT) {
        __syncthreads();
        stage<D>(Ks, k, b, h, k0, T, H, 1.f);
        stage<D>(Vs, v, b, h, k0, T, H, 1.f);
        __syncthreads();
        float s[8][4], dp[8][4];
#pragma unroll
        for (int i = 0; i < 8; i++) {
#pragma unroll
            for (int j = 0; j < 4; j++) s[i][j] = dp[i][j] = 0.f;
        }
        mma_rows<D, 8>(s, Qs, LD, row0, Ks, LD);
        mma_rows<D, 8>(dp, dYs, LD, row0, Vs, LD);
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
__device__ void flash_bwd_dkv(float* dk, float* dv, const float* q, const float* k, const float* v, const float* dy,
                              const float* lse, const float* delta, int T, int H, float scale) {
    constexpr int LD = Flash<D>::LD, TILE = Flash<D>::TILE;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16 *Ks = (bf16*)smem, *Vs = Ks + TILE, *Qs = Vs + TILE, *dYs = Qs + TILE;
    float *Ls = (float*)(dYs + TILE), *Dls = Ls + FT;
    int bh = blockIdx.y, b = bh / H, h = bh % H, k0 = blockIdx.x * FT;
    int warp = threadIdx.x >> 5, row0 = warp * 16;
    stage<D>(Ks, k, b, h, k0, T, H, 1.f);
    stage<D>(Vs, v, b, h, k0, T, H, 1.f);
    float ak[D / 8][4], av[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) {
#pragma unroll
        for (int j = 0; j < 4; j++) ak[i][j] = av[i][j] = 0.f;
    }
    for (int q0 = k0; q0 < T; q0 += FT) {
        __syncthreads();
        stage<D>(Qs, q, b, h, q0, T, H, scale);
        stage<D>(dYs, dy, b, h, q0, T, H, 1.f);
        for (int i = threadIdx.x; i < FT; i += FTHREADS) {
            int qi = q0 + i;
            Ls[i] = qi < T ? lse[(long)(b * T + qi) * H + h] : 0.f;
            Dls[i] = qi < T ? delta[(long)(b * T + qi) * H + h] : 0.f;
        }
        __syncthreads();
        float st[8][4], dpt[8][4];  // Sᵀ and ∂Pᵀ: rows are this warp's keys, columns queries
#pragma unroll
        for (int i = 0; i < 8; i++) {
#pragma unroll
            for (int j = 0; j < 4; j++) st[i][j] = dpt[i][j] = 0.f;
        }
        mma_rows<D, 8>(st, Ks, LD, row0, Qs, LD);
        mma_rows<D, 8>(dpt, Vs, LD, row0, dYs, LD);
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
        flash_fwd_##D(float* y, float* lse, const float* q, const float* k, const float* v, int T, int H,       \
                      float scale) {                                                                           \
        flash_fwd<D>(y, lse, q, k, v, T, H, scale);                                                            \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(FTHREADS)                                                     \
        flash_bwd_dq_##D(float* dq, const float* q, const float* k, const float* v, const float* dy,            \
                         const float* lse, const float* delta, int T, int H, float scale) {                    \
        flash_bwd_dq<D>(dq, q, k, v, dy, lse, delta, T, H, scale);                                             \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(FTHREADS)                                                     \
        flash_bwd_dkv_##D(float* dk, float* dv, const float* q, const float* k, const float* v,                 \
                          const float* dy, const float* lse, const float* delta, int T, int H, float scale) {  \
        flash_bwd_dkv<D>(dk, dv, q, k, v, dy, lse, delta, T, H, scale);                                        \
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
