// Generation: one token of sympow attention per (sequence, head) in the recurrent form
// (SPEC §9), the state [S | z] (D × (e+1), f64) resident on the GPU:
//   S ← γ·S + φ(k)·[v, 1]ᵀ,   y = φ(σq)ᵀ S[:, :e] / (φ(σq)ᵀ S[:, e] + ε).
// The state is read and written once per token (memory-bound: D·(e+1)·16 bytes per head),
// so a step costs the same at any context length. Compiled at run time by NVRTC.

#define DECODE_ROWS 64
#define DECODE_THREADS 256

// grid (ceil(D / DECODE_ROWS), batch·heads), DECODE_THREADS threads: each block updates
// DECODE_ROWS rows of one head's state and writes their contribution φ(σq)ᵀS to
// partial[head][tile][0..e] (read by sympow_decode_read: deterministic, no atomics). idx/coef:
// the φ_p table (D × p, D). A thread takes one column of every `groups`-th row (groups =
// DECODE_THREADS / (e+1) row groups side by side, so that most threads work when e+1 is
// narrower than the block), and loads eight rows before it updates them: the step is a read
// and a write of the state, and this keeps enough loads in flight to stream it.
extern "C" __global__ void __launch_bounds__(DECODE_THREADS)
    sympow_decode_update(double* __restrict__ S, double* __restrict__ partial, const float* q, const float* k,
                         const float* v, const float* log_g, const int* idx, const double* coef, int D, int p,
                         int d, int e, double scale) {
    __shared__ double phk[DECODE_ROWS], phq[DECODE_ROWS], red[DECODE_THREADS];
    int tile = blockIdx.x, bh = blockIdx.y, tiles = gridDim.x, e1 = e + 1, tid = threadIdx.x;
    int i0 = tile * DECODE_ROWS, rows = min(DECODE_ROWS, D - i0);
    if (tid < rows) {
        int i = i0 + tid;
        double fk = coef[i], fq = coef[i];
        for (int j = 0; j < p; j++) {
            int a = idx[i * p + j];
            fk *= (double)k[(long)bh * d + a];
            fq *= scale * (double)q[(long)bh * d + a];
        }
        phk[tid] = fk;
        phq[tid] = fq;
    }
    __syncthreads();
    double decay = log_g ? exp((double)log_g[bh]) : 1.0;
    double* s = S + ((long)bh * D + i0) * e1;
    bool wide = e1 >= DECODE_THREADS; // then one row group, over column chunks
    int groups = wide ? 1 : DECODE_THREADS / e1, g = wide ? 0 : tid / e1;
    for (int c0 = 0; c0 < e1; c0 += DECODE_THREADS) {
        int c = c0 + (wide ? tid : tid % e1);
        double acc = 0.0;
        if (g < groups && c < e1) {
            double vc = c < e ? (double)v[(long)bh * e + c] : 1.0;
            for (int r0 = g; r0 < rows; r0 += 8 * groups) {
                double x[8];
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    int r = r0 + u * groups;
                    x[u] = r < rows ? s[(long)r * e1 + c] : 0.0;
                }
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    int r = r0 + u * groups;
                    if (r < rows) {
                        double y = x[u] * decay + phk[r] * vc;
                        s[(long)r * e1 + c] = y;
                        acc += phq[r] * y;
                    }
                }
            }
        }
        red[tid] = acc;
        __syncthreads();
        if (g == 0 && c < e1) {
            for (int gg = 1; gg < groups; gg++) acc += red[gg * e1 + c];
            partial[((long)bh * tiles + tile) * e1 + c] = acc;
        }
        __syncthreads();
    }
}

// A prefill's final states, summed over its tokens in f64,
//   S[o][r][c] = Σ_t φ_r(k_t) · w_t [v_t, 1][c],   w_t = exp(Σ_{s>t} log γ_s),
// are a matrix product Φ(K)ᵀ · W[V, 1] with the tokens as its inner dimension: the host runs it
// as cuBLAS f64 GEMMs, a chunk of tokens at a time, over operands that the two kernels below
// make. (A kernel that made φ inside its own product, on the f64 tensor cores, took 5.5× the
// GEMMs' time: 971 against 176 ms over gpt2-124m's 12 layers for a 64k-token prompt on the H100.)

#define PREFILL_SCAN 1024

// w[o][t] = exp(Σ_{s>t} log γ_s) for head o = (b, h) of log_gates [batch, T, heads]: the weight
// of token t's term in the state after T tokens. A suffix sum in f64 by a block-wide scan: grid
// (batch·heads), PREFILL_SCAN threads, each over a contiguous run of tokens.
extern "C" __global__ void __launch_bounds__(PREFILL_SCAN)
    prefill_gate_weights(double* w, const float* log_gates, int T, int heads) {
    __shared__ double after[PREFILL_SCAN]; // Σ of log γ over the runs of threads ≥ tid
    int o = blockIdx.x, tid = threadIdx.x, per = (T + PREFILL_SCAN - 1) / PREFILL_SCAN;
    int t0 = min(T, tid * per), t1 = min(T, t0 + per);
    const float* g = log_gates + (long)(o / heads) * T * heads + o % heads; // token t: g[t·heads]
    double s = 0.0;
    for (int t = t0; t < t1; t++) s += (double)g[(long)t * heads];
    after[tid] = s;
    __syncthreads();
    for (int off = 1; off < PREFILL_SCAN; off *= 2) { // Hillis–Steele, towards the end
        double add = tid + off < PREFILL_SCAN ? after[tid + off] : 0.0;
        __syncthreads();
        after[tid] += add;
        __syncthreads();
    }
    double a = tid + 1 < PREFILL_SCAN ? after[tid + 1] : 0.0;
    for (int t = t1 - 1; t >= t0; t--) {
        w[(long)o * T + t] = exp(a);
        a += (double)g[(long)t * heads];
    }
}

// The GEMMs' operands for tokens t0 ≤ t < t0 + tc: phi[o][tt][r] = coef_r · Π_j k_t[idx[r·p + j]]
// and vw[o][tt][c] = w_t · [v_t, 1][c] (w null: ungated, w_t = 1), tt = t − t0, for k, v
// [batch, T, heads, d] and [batch, T, heads, e]. grid (tc, batch·heads), any blockDim; dynamic
// shared memory: d floats.
extern "C" __global__ void prefill_phi(double* phi, double* vw, const float* k, const float* v, const double* w,
                                       const int* idx, const double* coef, int T, int t0, int tc, int heads,
                                       int D, int p, int d, int e) {
    extern __shared__ float pk[]; // k_t
    int tt = blockIdx.x, o = blockIdx.y;
    long row = ((long)(o / heads) * T + t0 + tt) * heads + o % heads;
    for (int i = threadIdx.x; i < d; i += blockDim.x) pk[i] = k[row * d + i];
    __syncthreads();
    double* out = phi + ((long)o * tc + tt) * D;
    for (int r = threadIdx.x; r < D; r += blockDim.x) {
        double f = coef[r];
        for (int j = 0; j < p; j++) f *= (double)pk[idx[r * p + j]];
        out[r] = f;
    }
    double wt = w ? w[(long)o * T + t0 + tt] : 1.0;
    double* vo = vw + ((long)o * tc + tt) * (e + 1);
    for (int c = threadIdx.x; c <= e; c += blockDim.x) vo[c] = wt * (c < e ? (double)v[row * e + c] : 1.0);
}

// y[head][c] = Σ_tiles partial[..][c] / (Σ_tiles partial[..][e] + ε); one block per head
extern "C" __global__ void sympow_decode_read(float* y, const double* partial, int tiles, int e, double eps) {
    __shared__ double z;
    int bh = blockIdx.x, e1 = e + 1;
    const double* pp = partial + (long)bh * tiles * e1;
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int i = 0; i < tiles; i++) t += pp[(long)i * e1 + e];
        z = t + eps;
    }
    __syncthreads();
    for (int c = threadIdx.x; c < e; c += blockDim.x) {
        double t = 0.0;
        for (int i = 0; i < tiles; i++) t += pp[(long)i * e1 + c];
        y[(long)bh * e + c] = (float)(t / z);
    }
}

// ---- softmax: a KV cache, keys and values [batch, cap, heads, d] in f32 --------------------

// dst[b][r][:] = src[b][r][:] for r < rows, rows of `width` elements; src holds src_cap rows per
// sequence, dst dst_cap. grid (ceil(rows·width / blockDim), batch). Fills a cache from the
// prefill, and moves a cache into a larger buffer: keys and values (f32), cumulative gates (f64).
template <typename T>
__device__ void copy_rows(T* dst, const T* src, int rows, int width, int src_cap, int dst_cap) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)rows * width) return;
    long b = blockIdx.y;
    dst[b * dst_cap * width + i] = src[b * src_cap * width + i];
}
extern "C" __global__ void kv_cache_copy(float* dst, const float* src, int rows, int width, int src_cap,
                                         int dst_cap) {
    copy_rows(dst, src, rows, width, src_cap, dst_cap);
}
extern "C" __global__ void kv_cache_copy_f64(double* dst, const double* src, int rows, int width, int src_cap,
                                             int dst_cap) {
    copy_rows(dst, src, rows, width, src_cap, dst_cap);
}

// dst[b][*len][:] = src[b][:], rows of `width` floats, dst holding cap rows per sequence: a decode
// step's token appended where the count on the device says (a recorded step cannot take it as
// an argument). grid (ceil(width / blockDim), batch).
extern "C" __global__ void kv_cache_append(float* dst, const float* src, const int* len, int width, int cap) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= width) return;
    long b = blockIdx.y;
    dst[(b * cap + *len) * width + i] = src[b * width + i];
}

// gates[b][*len][h] = gates[b][*len − 1][h] + lg[b][h] (lg alone at the first row): a gated
// decode step's cumulative log gate G_t appended where the count on the device says, in f64 (a
// long context's G_t runs to thousands, whose differences G_t − G_s are the weights' decay).
// grid batch, blockDim ≥ heads.
extern "C" __global__ void kv_cache_gate_append(double* gates, const float* lg, const int* len, int heads, int cap) {
    int h = threadIdx.x;
    if (h >= heads) return;
    long b = blockIdx.x, n = *len;
    double prev = n > 0 ? gates[(b * cap + n - 1) * heads + h] : 0.0;
    gates[(b * cap + n) * heads + h] = prev + (double)lg[b * heads + h];
}

#define KV_SPLIT 256

// Flash-decoding, first pass: grid (cap / KV_SPLIT, batch·heads), blockDim a multiple of 32
// (128; ops.cu's block_max and block_sum reduce over it). The cache holds *len + 1 keys (the
// step's own appended after the *len before it; the count is on the device so that a recorded
// step reads the current one). Block (s, bh) takes keys [s·KV_SPLIT, +KV_SPLIT) of head bh and
// their log-weights ℓ as the quadratic form's (attention/tile.rs): ℓ = σq·k for softmax (power
// 0), p·ln|σq·k| for power p (−∞ where the score is 0), plus G_t − G_s where the cache is gated
// (gates non-null: the cumulative log gates, the query's own at row *len). It writes its running
// max m, Σ exp(ℓ − m) and Σ exp(ℓ − m)·v to part_ml[bh][s][0..2] and part_acc[bh][s][0..e]
// (combined by kv_decode_combine: deterministic, no atomics); a block past the keys, or whose
// weights are all zero, writes m = −∞ and zero sums, which the combine weighs by zero. Dynamic
// shared memory: (d rounded up to 4 + KV_SPLIT + 4·blockDim) floats.
extern "C" __global__ void kv_decode_partial(float* part_acc, float* part_ml, const float* q, const float* keys,
                                             const float* values, const double* gates, const int* len, int cap,
                                             int heads, int d, int e, float scale, float power) {
    extern __shared__ __align__(16) float sm[];
    float* qs = sm;                  // [d], scaled
    float* w = qs + ((d + 3) & ~3);  // [KV_SPLIT] scores, then weights
    float* red = w + KV_SPLIT;       // [4·blockDim]: the reductions' warp totals, then Σ p·v's groups
    int s = blockIdx.x, bh = blockIdx.y, splits = gridDim.x, tid = threadIdx.x, nt = blockDim.x;
    int b = bh / heads, h = bh % heads, j0 = s * KV_SPLIT, n = min(KV_SPLIT, *len + 1 - j0);
    for (int i = tid; i < d; i += nt) qs[i] = scale * q[(long)bh * d + i];
    const double* g = gates ? gates + (long)b * cap * heads + h : nullptr;  // G of row j: g[j·heads]
    double gt = g ? g[(long)*len * heads] : 0.0;
    __syncthreads();
    // a thread a key: its row is d contiguous floats
    float mx = __int_as_float(0xff800000); // −∞
    for (int j = tid; j < n; j += nt) {
        const float* kr = keys + (((long)b * cap + j0 + j) * heads + h) * d;
        float acc = 0.f;
        if ((d & 3) == 0) // rows 16-byte aligned
            for (int i = 0; i < d; i += 4) {
                float4 kv = *(const float4*)(kr + i);
                acc = fmaf(qs[i], kv.x, fmaf(qs[i + 1], kv.y, fmaf(qs[i + 2], kv.z, fmaf(qs[i + 3], kv.w, acc))));
            }
        else
            for (int i = 0; i < d; i++) acc = fmaf(qs[i], kr[i], acc);
        if (power > 0.f) acc = power * logf(fabsf(acc));
        if (g) acc += (float)(gt - g[(long)(j0 + j) * heads]);
        w[j] = acc;
        mx = fmaxf(mx, acc);
    }
    mx = block_max(mx, red);
    // every weight zero (or no key): exp(−∞ − 0) = 0 rather than exp(−∞ + ∞)
    float mref = mx == __int_as_float(0xff800000) ? 0.f : mx;
    float sum = 0.f;
    for (int j = tid; j < n; j += nt) {
        float p = expf(w[j] - mref);
        w[j] = p;
        sum += p;
    }
    sum = block_sum(sum, red);
    if (tid == 0) {
        part_ml[((long)bh * splits + s) * 2] = mx;
        part_ml[((long)bh * splits + s) * 2 + 1] = sum;
    }
    __syncthreads();
    if ((e & 3) == 0 && e / 4 <= nt) {
        // Σ p·v, rows 16-byte aligned: a thread 4 columns (e/4 threads a row, coalesced), the
        // block's nt / (e/4) groups each a stride of the keys (8 at e = 64: each thread's chain
        // of loads is an eighth of the split, where a thread a column walked half of it)
        int c4 = e / 4, groups = nt / c4, g = tid / c4, col = 4 * (tid % c4);
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        if (g < groups)
            for (int j = g; j < n; j += groups) {
                float4 x = *(const float4*)(values + (((long)b * cap + j0 + j) * heads + h) * e + col);
                float p = w[j];
                acc.x = fmaf(p, x.x, acc.x); acc.y = fmaf(p, x.y, acc.y);
                acc.z = fmaf(p, x.z, acc.z); acc.w = fmaf(p, x.w, acc.w);
            }
        float4* red4 = (float4*)red;  // group g's sums at [g·c4, +c4)
        if (g < groups) red4[tid] = acc;
        __syncthreads();
        if (tid < c4) {
            for (int gg = 1; gg < groups; gg++) {
                float4 o = red4[gg * c4 + tid];
                acc.x += o.x; acc.y += o.y; acc.z += o.z; acc.w += o.w;
            }
            *(float4*)(part_acc + ((long)bh * splits + s) * e + col) = acc;
        }
        return;
    }
    // Σ p·v otherwise: groups of e threads (a row of v, coalesced), each group a stride of the
    // keys; for e > blockDim, one group over column chunks
    int groups = max(1, nt / e);
    for (int c0 = 0; c0 < e; c0 += nt) {
        int g = e >= nt ? 0 : tid / e, col = c0 + (e >= nt ? tid : tid % e);
        float acc = 0.f;
        if (col < e && g < groups)
            for (int j = g; j < n; j += groups)
                acc = fmaf(w[j], values[(((long)b * cap + j0 + j) * heads + h) * e + col], acc);
        red[tid] = acc;
        __syncthreads();
        if (g == 0 && col < e) {
            for (int gg = 1; gg < groups; gg++) acc += red[gg * e + col];
            part_acc[((long)bh * splits + s) * e + col] = acc;
        }
        __syncthreads();
    }
}

// y[bh][c] = Σ_s exp(m_s − M)·acc_s[c] / (Σ_s exp(m_s − M)·l_s + ε·exp(−M)), M = max_s m_s (0
// where every weight is zero, as attention/mod.rs's normalise); a block a head. The step's last
// kernel, so it counts the appended token: *len += 1 (none of its blocks reads the count).
extern "C" __global__ void kv_decode_combine(float* y, const float* part_acc, const float* part_ml, int splits,
                                             int e, float eps, int* len) {
    int bh = blockIdx.x;
    if (bh == 0 && threadIdx.x == 0) *len += 1;
    const float* ml = part_ml + (long)bh * splits * 2;
    float mx = __int_as_float(0xff800000); // −∞
    for (int s = 0; s < splits; s++) mx = fmaxf(mx, ml[2 * s]);
    if (mx == __int_as_float(0xff800000)) mx = 0.f;
    float z = 0.f;
    for (int s = 0; s < splits; s++) z += expf(ml[2 * s] - mx) * ml[2 * s + 1];
    // (softmax's ε is 0, and exp(−M) may overflow where its scores are all below −88)
    if (eps > 0.f) z += eps * expf(-mx);
    for (int c = threadIdx.x; c < e; c += blockDim.x) {
        float t = 0.f;
        for (int s = 0; s < splits; s++) t += expf(ml[2 * s] - mx) * part_acc[((long)bh * splits + s) * e + c];
        y[(long)bh * e + c] = t / z;
    }
}
