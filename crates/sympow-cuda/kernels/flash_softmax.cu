// Causal softmax attention (the baseline), flash-style on tensor cores: the scores never leave
// the chip. The GPU twin of the quadratic form in crates/sympow/src/attention/quadratic.rs for
// ungated softmax with ε = 0, head dimension D = dk = dv ∈ {32, 64, 128}.
//
// The same kernels with POWER take ungated symmetric power attention of any even p in its
// quadratic form (p = 4, whose chunked state is too large): the weight of a pair is
// (σq·k)^p = e^ℓ with the log-weight ℓ = p·ln|σq·k| in place of softmax's σq·k, and
// y = Σ e^ℓ v / (Σ e^ℓ + ε); everything else — the running maximum, the log-normaliser, the
// backward's ∂ℓ = P ∘ (∂P − Δ) — is softmax's, and ∂(σq·k) = ∂ℓ·p/(σq·k).
//
// A block is 4 warps and a tile of rows (queries in the forward and the ∂q pass, keys in the
// ∂k∂v pass: 128 at D ≤ 64, else 64); each warp owns 32 or 16 of them and walks
// the other side 64 at a time, the next tile streaming into shared memory (cp.async,
// double-buffered) while this one is multiplied. Exponentials are base 2 with log₂e folded into
// one FMA a score, and only tiles that cross the diagonal (or T) are masked.
// flash_stage first copies q (×σ), k, v (and ∂y) from the model's f32 [B, T, H, D] into bf16
// [B, H, T, D], so each tile is one contiguous block; every product is mma.sync m16n8k16 with
// f32 accumulation.
//   flash_fwd       online softmax over key tiles: y, and the log-sum-exp of each row
//   flash_bwd_delta Δ_t = ∂y_t·y_t, and −lse_t·log₂e for both passes
//   flash_bwd_dq    per query tile, recomputing P from the log-sum-exp: ∂q = σ Σ_s ∂S_ts k_s
//   flash_bwd_dkv   per key tile: ∂v = Pᵀ∂y, ∂k = ∂Sᵀ(σq), with ∂S = P ∘ (∂y vᵀ − Δ)
// Two backward passes instead of FlashAttention-2's atomics: deterministic, at the price of
// computing S and ∂P twice.

#define FT 64             // rows of a streamed tile (the other side, walked FT at a time)
#define FTHREADS 128      // 4 warps
#define NEG_INF __int_as_float(0xff800000)

template <int D> struct Flash {
    static constexpr int LD = D + 8;  // bf16 row stride in shared memory (16-byte rows, fewer conflicts)
    static constexpr int TILE = FT * LD;
    // row tiles per warp (two at D ≤ 64; at 128 the accumulators would not fit)
    static constexpr int M = D <= 64 ? 2 : 1;
    static constexpr int QF = 64 * M;                        // rows per block (queries; keys in dkv)
    static constexpr int fwd = (QF * LD + 4 * TILE) * 2;     // Q, 2 × (K, V)
    static constexpr int dq = (2 * QF * LD + 4 * TILE) * 2;  // Q, ∂Y, 2 × (K, V)
    static constexpr int dkv = (2 * QF * LD + 4 * TILE) * 2 + 4 * FT * 4;  // K, V, 2 × (Q, ∂Y, lse, Δ)
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

// The two products every pass is made of, for a warp's M row tiles of 16 (rows row0 + 16·mm), each
// B fragment (ldmatrix) feeding the M of them:
// acc[M][NT] = A·Bᵀ over D — A's fragments from a_frag(mm, kk, out), B the FT-row tile b's rows
// 8·n0 … 8·(n0 + NT) (n-major): scores (NT = 8) or a sliver of ∂P (NT = 2).
template <int D, int M, int NT, class AFrag>
__device__ __forceinline__ void mma_abt(float (*acc)[NT][4], AFrag a_frag, const bf16* b, int n0) {
    constexpr int LD = Flash<D>::LD;
#pragma unroll
    for (int mm = 0; mm < M; mm++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++) acc[mm][nt][0] = acc[mm][nt][1] = acc[mm][nt][2] = acc[mm][nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        u32 af[M][4];
#pragma unroll
        for (int mm = 0; mm < M; mm++) a_frag(mm, kk, af[mm]);
#pragma unroll
        for (int nt = 0; nt < NT; nt += 2) {
            u32 bf[4];
            ldb2_nmajor(bf, b, LD, (n0 + nt) * 8, kk * 16);
#pragma unroll
            for (int mm = 0; mm < M; mm++) {
                mma16816(acc[mm][nt], af[mm], bf);
                mma16816(acc[mm][nt + 1], af[mm], bf + 2);
            }
        }
    }
}
// A's fragments as mma_abt takes them: read from shared memory (rows row0 + 16·mm of the tile a)
// at each k-step. The backward passes read theirs so rather than keep them in registers across
// the loop: their accumulators need the registers (they spilled with Q's, ∂Y's, K's or V's
// fragments kept); the forward keeps Q's (4 % faster at 16k–64k than reading them per tile).
template <int D> struct SharedRows {
    const bf16* a;
    int row0;
    __device__ __forceinline__ void operator()(int mm, int kk, u32* out) const {
        lda(out, a, Flash<D>::LD, row0 + 16 * mm, kk * 16);
    }
};
// acc[M][D/8] += P·B over the FT columns of P — P the M row tiles' accumulators (probabilities or
// ∂S, rounded to bf16 as A fragments), B the FT × D tile b (k-major: token rows): P·V, ∂S·K,
// P·∂Y, ∂Sᵀ·Q.
// One k-step of it: the 16 columns kk of P, given as A fragments.
template <int D, int M>
__device__ __forceinline__ void mma_pb_frag(float (*acc)[D / 8][4], const u32 (*a)[4], const bf16* b, int kk) {
    constexpr int LD = Flash<D>::LD;
#pragma unroll
    for (int dt = 0; dt < D / 8; dt += 2) {
        u32 bf[4];
        ldb2_kmajor(bf, b, LD, kk * 16, dt * 8);
#pragma unroll
        for (int mm = 0; mm < M; mm++) {
            mma16816(acc[mm][dt], a[mm], bf);
            mma16816(acc[mm][dt + 1], a[mm], bf + 2);
        }
    }
}
template <int D, int M>
__device__ __forceinline__ void mma_pb(float (*acc)[D / 8][4], float (*p)[8][4], const bf16* b) {
#pragma unroll
    for (int kk = 0; kk < FT / 16; kk++) {
        u32 a[M][4];
#pragma unroll
        for (int mm = 0; mm < M; mm++) acc_to_a(a[mm], p[mm][2 * kk], p[mm][2 * kk + 1]);
        mma_pb_frag<D, M>(acc, a, b, kk);
    }
}
// The same over the 16 columns kk alone, P's two 8-column tiles given apart (p[mm][0..2]).
template <int D, int M>
__device__ __forceinline__ void mma_pb_step(float (*acc)[D / 8][4], float (*p)[2][4], const bf16* b, int kk) {
    u32 a[M][4];
#pragma unroll
    for (int mm = 0; mm < M; mm++) acc_to_a(a[mm], p[mm][0], p[mm][1]);
    mma_pb_frag<D, M>(acc, a, b, kk);
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

// log₂x (lg2.approx.ftz: log₂0 = −∞)
__device__ __forceinline__ float log2_approx(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
#define LN2 0.6931471805599453f

// For a power's score s (lg = log₂|s|, nl = −lse·log₂e): P·p/s, the factor that turns ∂ℓ into
// ∂s (ℓ = p·ln|s|), as p·sign(s)·2^((p−1)·lg + nl) — zero where s is, where P/s would be 0/0.
__device__ __forceinline__ float power_dscore(float s, float lg, float nl, float pw) {
    return copysignf(pw, s) * exp2_approx(fmaf(pw - 1.f, lg, nl));
}

// A block of 4 warps takes QF = 64·M queries, each warp 16·M consecutive rows (M row tiles: each
// B fragment of K and V then feeds M products, and the warp has M independent chains of them)
// and walks the keys FT at a time. Only the tiles that cross a warp's diagonal (or T) are masked;
// a warp skips the tiles wholly after its rows (they are all masked). The query tiles with the
// most keys start first (blockIdx.x counts down from the last tile), so that the short ones fill
// in behind them rather than the long ones ending alone.
// POWER: the log-weights p·ln|s| (pw = p), and ε in the normaliser.
template <int D, bool POWER>
__device__ void flash_fwd(float* y, float* lse, const bf16* qs, const bf16* ks, const bf16* vs, int T, int H,
                          float pw, float eps) {
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
    u32 qf[M][D / 16][4];  // Q's fragments, in registers for the whole loop
    auto q_frag = [&](int mm, int kk, u32* out) {
#pragma unroll
        for (int i = 0; i < 4; i++) out[i] = qf[mm][kk][i];
    };
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
            mma_abt<D, M, 8>(s, q_frag, Ks, 0);
            bool masked = k0 + FT - 1 > first || k0 + FT > T;  // some pair of the tile is masked
#pragma unroll
            for (int mm = 0; mm < M; mm++) {
                float mx[2] = {m[mm][0], m[mm][1]};
#pragma unroll
                for (int nt = 0; nt < 8; nt++)
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        if (POWER) s[mm][nt][i] = pw * LN2 * log2_approx(fabsf(s[mm][nt][i]));
                        if (masked) {
                            int kq = k0 + acc_col(nt, i), qi = first + 16 * mm + acc_row(i);
                            if (kq > qi || kq >= T) s[mm][nt][i] = NEG_INF;
                        }
                        mx[i >> 1] = fmaxf(mx[i >> 1], s[mm][nt][i]);
                    }
                float ms[2];  // −max·log₂e: 2^(s·log₂e + ms) = e^(s − max)
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    mx[r] = quad_max(mx[r]);
                    // every row sees key 0 in the first tile: mx is finite from there on, and
                    // alpha = 2^−∞ = 0 against the first tile's m = −∞ — but for a power, whose
                    // weight (σq·k)^p is 0 where q·k is, a row may see only zeros so far: it
                    // measures from 0 until it sees a weight
                    if (POWER && mx[r] == NEG_INF) mx[r] = 0.f;
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
            mma_pb<D, M>(o, s, Vs);  // O += P·V
        }
        __syncthreads();  // the next iteration's prefetch overwrites this buffer
    }
#pragma unroll
    for (int mm = 0; mm < M; mm++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float sum = quad_sum(l[mm][r]);
            int qi = first + 16 * mm + acc_row(2 * r);
            if (qi >= T) continue;
            long base = ((long)(b * T + qi) * H + h) * D;
            float inv = 1.f / sum, ln_norm = m[mm][r] + logf(sum);
            if (POWER && eps > 0.f) {
                // ln(Σ e^ℓ + ε) as a log-add-exp (e^−m may overflow), y = Σ e^ℓ v / that
                float a = ln_norm, e = logf(eps), hi = fmaxf(a, e);
                ln_norm = hi + log1pf(__expf(-fabsf(a - e)));
                inv = __expf(m[mm][r] - ln_norm);
            }
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++)
                *(float2*)(y + base + acc_col(dt, 0)) =
                    make_float2(o[mm][dt][2 * r] * inv, o[mm][dt][2 * r + 1] * inv);
            if ((threadIdx.x & 3) == 0) lse[(long)(b * T + qi) * H + h] = ln_norm;
        }
}

// Δ for every row of [B, T, H, D], a warp a row (its lanes over the row's D contiguous floats),
// and the row's −lse·log₂e (P = 2^(s·log₂e − lse·log₂e) in both backward passes)
extern "C" __global__ void flash_bwd_delta(float* delta, float* nlse, const float* dy, const float* y,
                                           const float* lse, long rows, int D) {
    long r = (blockIdx.x * (long)blockDim.x + threadIdx.x) >> 5;
    if (r >= rows) return;
    int lane = threadIdx.x & 31;
    float s = 0.f;
    for (int c = lane; c < D; c += 32) s += dy[r * D + c] * y[r * D + c];
    s = warp_sum(s);
    if (lane == 0) {
        delta[r] = s;
        nlse[r] = -lse[r] * LOG2E;
    }
}

// Per query tile of QF = 64·M rows (M row tiles a warp, as in the forward): ∂q = σ Σ_s ∂S_ts k_s
// with P recomputed from the log-sum-exp and ∂S = P ∘ (∂y vᵀ − Δ). ∂P is formed two 8-key tiles
// at a time and turned into ∂S in place of P, so that only a sliver of it is ever live.
// POWER: ∂(σq·k) = ∂ℓ·p/(σq·k) = power_dscore·(∂P − Δ).
template <int D, bool POWER>
__device__ void flash_bwd_dq(float* dq, const bf16* qs, const bf16* ks, const bf16* vs, const bf16* dys,
                             const float* nlse, const float* delta, int T, int H, float scale, float pw) {
    constexpr int M = Flash<D>::M, QF = Flash<D>::QF, LD = Flash<D>::LD, TILE = Flash<D>::TILE;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16 *Qs = (bf16*)smem, *dYs = Qs + QF * LD, *Kb = dYs + QF * LD, *Vb = Kb + 2 * TILE;
    // the query tiles with the most keys first (as in the forward)
    int bh = blockIdx.y, b = bh / H, h = bh % H, q0 = (gridDim.x - 1 - blockIdx.x) * QF;
    int warp = threadIdx.x >> 5, row0 = warp * 16 * M;
    int first = q0 + row0, last = first + 16 * M - 1;  // this warp's query rows
    long head = (long)bh * T * D;
    int ntiles = (min(T, q0 + QF) + FT - 1) / FT;
    load_rows_async(Qs, LD, qs + head + (long)q0 * D, min(QF, T - q0), QF, D);
    load_rows_async(dYs, LD, dys + head + (long)q0 * D, min(QF, T - q0), QF, D);
    fetch<D>(Kb, ks + head, 0, T);
    fetch<D>(Vb, vs + head, 0, T);
    cp_async_commit();
    float L[M][2], Dl[M][2], acc[M][D / 8][4];
#pragma unroll
    for (int mm = 0; mm < M; mm++) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            int qi = first + 16 * mm + acc_row(2 * r);
            L[mm][r] = qi < T ? nlse[(long)(b * T + qi) * H + h] : 0.f;
            Dl[mm][r] = qi < T ? delta[(long)(b * T + qi) * H + h] : 0.f;
        }
#pragma unroll
        for (int i = 0; i < D / 8; i++) acc[mm][i][0] = acc[mm][i][1] = acc[mm][i][2] = acc[mm][i][3] = 0.f;
    }
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
        if (k0 <= last) {  // (warp-uniform) some key of the tile is visible to some row of the warp
            float s[M][8][4];
            mma_abt<D, M, 8>(s, SharedRows<D>{Qs, row0}, Ks, 0);
            bool masked = k0 + FT - 1 > first || k0 + FT > T;  // rows past T are never stored
#pragma unroll
            for (int nt = 0; nt < 8; nt += 2) {
                float dp[M][2][4];
                mma_abt<D, M, 2>(dp, SharedRows<D>{dYs, row0}, Vs, nt);
#pragma unroll
                for (int mm = 0; mm < M; mm++)
#pragma unroll
                    for (int j = 0; j < 2; j++)
#pragma unroll
                        for (int i = 0; i < 4; i++) {
                            float u = s[mm][nt + j][i], p;
                            if (POWER)  // P·p/s
                                p = power_dscore(u, log2_approx(fabsf(u)), L[mm][i >> 1], pw);
                            else
                                p = exp2_approx(fmaf(u, LOG2E, L[mm][i >> 1]));
                            int kq = k0 + acc_col(nt + j, i), qi = first + 16 * mm + acc_row(i);
                            if (masked && (kq > qi || kq >= T)) p = 0.f;
                            s[mm][nt + j][i] = p * (dp[mm][j][i] - Dl[mm][i >> 1]);  // ∂S
                        }
            }
            mma_pb<D, M>(acc, s, Ks);  // ∂q += ∂S·K
        }
        __syncthreads();
    }
#pragma unroll
    for (int mm = 0; mm < M; mm++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            int qi = first + 16 * mm + acc_row(2 * r);
            if (qi >= T) continue;
            long base = ((long)(b * T + qi) * H + h) * D;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++)
                *(float2*)(dq + base + acc_col(dt, 0)) =
                    make_float2(acc[mm][dt][2 * r] * scale, acc[mm][dt][2 * r + 1] * scale);
        }
}

// Per key tile of QF = 64·M rows (M row tiles a warp): ∂v = Pᵀ∂y and ∂k = ∂Sᵀ(σq), walking the
// queries from the tile's first key on. P is used for ∂v first, then becomes ∂S in place, its ∂P
// formed two 8-query tiles at a time. POWER needs the scores themselves for ∂S (P·p/s), so it
// takes P and ∂S of 16 queries at a time from them, ∂v's product a k-step at a time.
template <int D, bool POWER>
__device__ void flash_bwd_dkv(float* dk, float* dv, const bf16* qs, const bf16* ks, const bf16* vs, const bf16* dys,
                              const float* nlse, const float* delta, int T, int H, float pw) {
    constexpr int M = Flash<D>::M, QF = Flash<D>::QF, LD = Flash<D>::LD, TILE = Flash<D>::TILE;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16 *Ks = (bf16*)smem, *Vs = Ks + QF * LD, *Qb = Vs + QF * LD, *dYb = Qb + 2 * TILE;
    float* Lb = (float*)(dYb + 2 * TILE);  // 2 × (−lse·log₂e, Δ) of FT rows
    // (the key tiles with the most queries, the first, start first in launch order)
    int bh = blockIdx.y, b = bh / H, h = bh % H, k0 = blockIdx.x * QF;
    int warp = threadIdx.x >> 5, row0 = warp * 16 * M;
    int first = k0 + row0, last = first + 16 * M - 1;  // this warp's keys
    long head = (long)bh * T * D;
    load_rows_async(Ks, LD, ks + head + (long)k0 * D, min(QF, T - k0), QF, D);
    load_rows_async(Vs, LD, vs + head + (long)k0 * D, min(QF, T - k0), QF, D);
    auto fetch_queries = [&](int q0, int buf) {
        fetch<D>(Qb + buf * TILE, qs + head, q0, T);
        fetch<D>(dYb + buf * TILE, dys + head, q0, T);
        // −lse·log₂e and Δ of each query (0 past T), in the same copy group as the tiles
        for (int i = threadIdx.x; i < FT; i += FTHREADS) {
            int qi = q0 + i;
            long at = qi < T ? (long)(b * T + qi) * H + h : 0;
            cp_async4(Lb + buf * 2 * FT + i, nlse + at, qi < T);
            cp_async4(Lb + buf * 2 * FT + FT + i, delta + at, qi < T);
        }
    };
    fetch_queries(k0, 0);
    cp_async_commit();
    float ak[M][D / 8][4], av[M][D / 8][4];
#pragma unroll
    for (int mm = 0; mm < M; mm++)
#pragma unroll
        for (int i = 0; i < D / 8; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) ak[mm][i][j] = av[mm][i][j] = 0.f;
    for (int q0 = k0, it = 0; q0 < T; q0 += FT, it++) {
        if (q0 + FT < T) fetch_queries(q0 + FT, (it + 1) & 1);
        cp_async_commit();
        cp_async_wait_prev();
        __syncthreads();
        const bf16 *Qs = Qb + (it & 1) * TILE, *dYs = dYb + (it & 1) * TILE;
        const float *Ls = Lb + (it & 1) * 2 * FT, *Dls = Ls + FT;
        if (q0 + FT - 1 >= first) {  // (warp-uniform) some query of the tile sees some key of the warp
            float st[M][8][4];  // Sᵀ, then P, then ∂Sᵀ: rows are this warp's keys, columns queries
            mma_abt<D, M, 8>(st, SharedRows<D>{Ks, row0}, Qs, 0);
            // the diagonal, and queries past T (zero rows, whose p must not reach real keys)
            bool masked = last > q0 || q0 + FT > T;
            if (POWER) {
#pragma unroll
                for (int nt = 0; nt < 8; nt += 2) {
                    float pp[M][2][4], dpt[M][2][4];
                    mma_abt<D, M, 2>(dpt, SharedRows<D>{Vs, row0}, dYs, nt);
#pragma unroll
                    for (int mm = 0; mm < M; mm++)
#pragma unroll
                        for (int j = 0; j < 2; j++)
#pragma unroll
                            for (int i = 0; i < 4; i++) {
                                int c = acc_col(nt + j, i), qi = q0 + c, kq = first + 16 * mm + acc_row(i);
                                float u = st[mm][nt + j][i], lg = log2_approx(fabsf(u));
                                float p = exp2_approx(fmaf(pw, lg, Ls[c]));
                                float f = power_dscore(u, lg, Ls[c], pw);  // P·p/s
                                if (masked && (kq > qi || qi >= T)) p = f = 0.f;
                                pp[mm][j][i] = p;
                                st[mm][nt + j][i] = f * (dpt[mm][j][i] - Dls[c]);
                            }
                    mma_pb_step<D, M>(av, pp, dYs, nt / 2);  // ∂v += P·∂Y over these 16 queries
                }
                mma_pb<D, M>(ak, st, Qs);  // ∂k += ∂Sᵀ·Q
            } else {
#pragma unroll
                for (int mm = 0; mm < M; mm++)
#pragma unroll
                    for (int nt = 0; nt < 8; nt++)
#pragma unroll
                        for (int i = 0; i < 4; i++) {
                            int c = acc_col(nt, i), qi = q0 + c, kq = first + 16 * mm + acc_row(i);
                            float p = exp2_approx(fmaf(st[mm][nt][i], LOG2E, Ls[c]));
                            if (masked && (kq > qi || qi >= T)) p = 0.f;
                            st[mm][nt][i] = p;
                        }
                mma_pb<D, M>(av, st, dYs);  // ∂v += P·∂Y over the tile's queries
                // ∂Pᵀ = V·∂Yᵀ two 8-query tiles at a time, and ∂Sᵀ = P ∘ (∂Pᵀ − Δ) in place of P
#pragma unroll
                for (int nt = 0; nt < 8; nt += 2) {
                    float dpt[M][2][4];
                    mma_abt<D, M, 2>(dpt, SharedRows<D>{Vs, row0}, dYs, nt);
#pragma unroll
                    for (int mm = 0; mm < M; mm++)
#pragma unroll
                        for (int j = 0; j < 2; j++)
#pragma unroll
                            for (int i = 0; i < 4; i++)
                                st[mm][nt + j][i] *= dpt[mm][j][i] - Dls[acc_col(nt + j, i)];
                }
                mma_pb<D, M>(ak, st, Qs);  // ∂k += ∂Sᵀ·Q
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int mm = 0; mm < M; mm++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            int kq = first + 16 * mm + acc_row(2 * r);
            if (kq >= T) continue;
            long base = ((long)(b * T + kq) * H + h) * D;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                int c = acc_col(dt, 0);
                *(float2*)(dk + base + c) = make_float2(ak[mm][dt][2 * r], ak[mm][dt][2 * r + 1]);
                *(float2*)(dv + base + c) = make_float2(av[mm][dt][2 * r], av[mm][dt][2 * r + 1]);
            }
        }
}

// Softmax (flash_fwd_D …) and power (flash_fwd_pow_D …, p = pw and ε as arguments).
#define FLASH_INSTANCES(D) FLASH_KERNELS(D, , false) FLASH_KERNELS(D, pow_, true)
#define FLASH_KERNELS(D, KIND, POWER)                                                                          \
    extern "C" __global__ void __launch_bounds__(FTHREADS) flash_fwd_##KIND##D(                                 \
        float* y, float* lse, const bf16* qs, const bf16* ks, const bf16* vs, int T, int H, float pw, float eps) { \
        flash_fwd<D, POWER>(y, lse, qs, ks, vs, T, H, pw, eps);                                                \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(FTHREADS) flash_bwd_dq_##KIND##D(                              \
        float* dq, const bf16* qs, const bf16* ks, const bf16* vs, const bf16* dys, const float* nlse,          \
        const float* delta, int T, int H, float scale, float pw) {                                            \
        flash_bwd_dq<D, POWER>(dq, qs, ks, vs, dys, nlse, delta, T, H, scale, pw);                             \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(FTHREADS) flash_bwd_dkv_##KIND##D(                             \
        float* dk, float* dv, const bf16* qs, const bf16* ks, const bf16* vs, const bf16* dys, const float* nlse, \
        const float* delta, int T, int H, float pw) {                                                          \
        flash_bwd_dkv<D, POWER>(dk, dv, qs, ks, vs, dys, nlse, delta, T, H, pw);                               \
    }

FLASH_INSTANCES(32)
FLASH_INSTANCES(64)
FLASH_INSTANCES(128)

// Per head dimension D = 32, 64, 128: shared-memory bytes of fwd, dq, dkv, then the rows a block
// takes in each (4 ints each, 12 in all), read by the host.
#define FLASH_SIZES(i, D) \
    o[4 * i] = Flash<D>::fwd, o[4 * i + 1] = Flash<D>::dq, o[4 * i + 2] = Flash<D>::dkv, o[4 * i + 3] = Flash<D>::QF
extern "C" __global__ void flash_smem_sizes(int* o) {
    FLASH_SIZES(0, 32);
    FLASH_SIZES(1, 64);
    FLASH_SIZES(2, 128);
}
