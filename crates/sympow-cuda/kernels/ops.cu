// Element-wise and per-row ops of the CUDA backend, each the GPU twin of the CPU op of the
// same name in crates/sympow/src/ops (the reference they are tested against on the device).
// f32 storage, f32 arithmetic; per-row reductions accumulate in f32 within a block.
// Compiled at run time by NVRTC.

#define BLOCK 256

__device__ float block_sum(float v, float* shm) {
    // sum over the block's threads; every thread gets the total
    v = warp_sum(v);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    float t = 0.f;
    int warps = (blockDim.x + 31) >> 5;
    for (int w = 0; w < warps; w++) t += shm[w];
    return t;
}

__device__ float block_max(float v, float* shm) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    float t = __int_as_float(0xff800000);
    int warps = (blockDim.x + 31) >> 5;
    for (int w = 0; w < warps; w++) t = fmaxf(t, shm[w]);
    return t;
}

extern "C" __global__ void add_assign(float* dst, const float* src, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n) dst[i] += src[i];
}

extern "C" __global__ void mul(float* out, const float* a, const float* b, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] * b[i];
}

extern "C" __global__ void broadcast_rows(float* out, const float* row, long rows, int c) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < rows * c) out[i] = row[i % c];
}

// one thread per column, rows in order (deterministic)
// Column sums over many rows in two deterministic passes (one thread per column serialises
// over every row and leaves most of the GPU idle): blocks of 32 columns × 8 row lanes sum a
// split of `split` rows each into partial[split index][column]; fold_partials adds the splits.
extern "C" __global__ void column_partials(float* partial, const float* x, long rows, int c, long split) {
    __shared__ float shm[8][33];
    int j = blockIdx.x * 32 + threadIdx.x;
    long r0 = (long)blockIdx.y * split, r1 = min(rows, r0 + split);
    float s = 0.f;
    if (j < c)
        for (long r = r0 + threadIdx.y; r < r1; r += 8) s += x[r * c + j];
    shm[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && j < c) {
        float t = 0.f;
        for (int y = 0; y < 8; y++) t += shm[y][threadIdx.x];
        partial[blockIdx.y * (long)c + j] = t;
    }
}

// out[j] = Σ_s partial[s][j] (accumulate: out[j] += …); a null out is skipped
extern "C" __global__ void fold_partials(float* out, const float* partial, int splits, int c, int accumulate) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (!out || j >= c) return;
    float s = 0.f;
    for (int i = 0; i < splits; i++) s += partial[(long)i * c + j];
    out[j] = accumulate ? out[j] + s : s;
}

// The multi-tensor kernels (sums of squares, AdamW) take a table of chunks of at most 2^16
// elements, each chunk a block: one launch for every parameter tensor of a model.
struct SquaresChunk {
    const float* x;
    long long n;
};

// every chunk set to 0 (the gradient buffers at each step's start; chunks start 16-byte aligned)
extern "C" __global__ void zero_chunks(const SquaresChunk* chunks) {
    SquaresChunk c = chunks[blockIdx.x];
    float* x = (float*)c.x;
    long long n4 = c.n >> 2;
    for (long long i = threadIdx.x; i < n4; i += blockDim.x) ((float4*)x)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    for (long long i = 4 * n4 + threadIdx.x; i < c.n; i += blockDim.x) x[i] = 0.f;
}

// per-chunk sums of squares, in double
extern "C" __global__ void sum_squares(double* partial, const SquaresChunk* chunks) {
    __shared__ double shm[BLOCK];
    SquaresChunk c = chunks[blockIdx.x];
    double s = 0.0;
    for (long long i = threadIdx.x; i < c.n; i += blockDim.x) {
        double v = c.x[i];
        s += v * v;
    }
    shm[threadIdx.x] = s;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) shm[threadIdx.x] += shm[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = shm[0];
}

// bf16 copies of matrix-product operands (round to nearest even, in integer arithmetic: this
// module is compiled for every architecture, and cvt to bf16 needs sm_80).
__device__ unsigned int bf16_bits(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;  // NaN stays NaN
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// copy a column block [col0, col0+w) of x [rows, total] into out [rows, w], or back (dir = 1)
extern "C" __global__ void copy_columns(float* out, const float* x, long rows, int total, int col0, int w, int dir) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= rows * w) return;
    long r = i / w; int j = i % w;
    if (dir == 0) out[i] = x[r * total + col0 + j];
    else out[r * total + col0 + j] = x[i];
}

// column block [col0, col0+w) of the bf16 out [rows, total] from x [rows, w], rounded as
// f32_to_bf16 rounds
extern "C" __global__ void copy_columns_to_bf16(unsigned short* out, const float* x, long rows, int total, int col0,
                                                int w) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= rows * w) return;
    long r = i / w; int j = i % w;
    out[r * total + col0 + j] = (unsigned short)bf16_bits(x[i]);
}

extern "C" __global__ void fill_rows(float* out, const float* bias, long rows, int c) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < rows * c) out[i] = bias[i % c];
}

// ---- GELU (tanh approximation) -----------------------------------------------------------
#define GELU_K 0.7978845608028654f
__device__ float tanh_exp(float u) { return 1.f - 2.f / (1.f + __expf(2.f * u)); }

__device__ __forceinline__ float gelu_value(float v) {
    return 0.5f * v * (1.f + tanh_exp(GELU_K * (v + 0.044715f * v * v * v)));
}
__device__ __forceinline__ float gelu_grad(float v, float dy) {
    float th = tanh_exp(GELU_K * (v + 0.044715f * v * v * v));
    float du = GELU_K * (1.f + 3.f * 0.044715f * v * v);
    return dy * (0.5f * (1.f + th) + 0.5f * v * (1.f - th * th) * du);
}

extern "C" __global__ void gelu_forward(float* y, const float* x, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n) y[i] = gelu_value(x[i]);
}

extern "C" __global__ void gelu_backward(float* dx, const float* x, const float* dy, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n) dx[i] = gelu_grad(x[i], dy[i]);
}

// ---- layer norm: one block per row ----------------------------------------------------------
extern "C" __global__ void layer_norm_forward(float* y, float* mean, float* rstd, const float* x,
                                              const float* w, const float* b, int c, float eps) {
    __shared__ float shm[32];
    long r = blockIdx.x;
    const float* xr = x + r * c;
    float s = 0.f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) s += xr[j];
    float mu = block_sum(s, shm) / c;
    float q = 0.f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) { float d = xr[j] - mu; q += d * d; }
    float rs = rsqrtf(block_sum(q, shm) / c + eps);
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float n = (xr[j] - mu) * rs;
        y[r * c + j] = n * (w ? w[j] : 1.f) + (b ? b[j] : 0.f);
    }
    if (threadIdx.x == 0) { mean[r] = mu; rstd[r] = rs; }
}

// ∂x written, or (accumulate) added to dx: the residual stream's gradient, as add_assign adds
extern "C" __global__ void layer_norm_backward(float* dx, const float* x, const float* dy, const float* w,
                                               const float* mean, const float* rstd, int c, int accumulate) {
    __shared__ float shm[32];
    long r = blockIdx.x;
    float mu = mean[r], rs = rstd[r];
    float sg = 0.f, sgn = 0.f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float g = dy[r * c + j] * (w ? w[j] : 1.f);
        sg += g;
        sgn += g * (x[r * c + j] - mu) * rs;
    }
    sg = block_sum(sg, shm);
    sgn = block_sum(sgn, shm);
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float n = (x[r * c + j] - mu) * rs;
        float g = dy[r * c + j] * (w ? w[j] : 1.f);
        float v = rs * (g - sg / c - n * sgn / c);
        dx[r * c + j] = accumulate ? dx[r * c + j] + v : v;
    }
}

// ---- layer norm a warp a row, the row in registers (c % 4 == 0, c ≤ 128·LN_V; other widths
// take the block-a-row kernels above): one read of x (and ∂y), one write of the output ----------
#define LN_V 8          // float4 groups a lane holds
#define LN_WARPS 4      // warps a block
#define LN_BWD_ROWS 64  // rows a block of the backward (its ∂w, ∂b partial sums); 16 a warp

// the row's float4 groups this lane holds (groups lane, lane + 32, …; zeros past c)
__device__ __forceinline__ void ln_load(float4* v, const float* row, int c4) {
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int k = 0; k < LN_V; k++) {
        int j = k * 32 + lane;
        v[k] = j < c4 ? ((const float4*)row)[j] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
}
__device__ __forceinline__ float4 ln_param(const float* p, int j, float none) {
    return p ? ((const float4*)p)[j] : make_float4(none, none, none, none);
}

extern "C" __global__ void layer_norm_forward_rows(float* y, float* mean, float* rstd, const float* x,
                                                   const float* w, const float* b, long rows, int c, float eps) {
    long r = (blockIdx.x * (long)blockDim.x + threadIdx.x) >> 5;
    if (r >= rows) return;
    int lane = threadIdx.x & 31, c4 = c >> 2;
    float4 v[LN_V];
    ln_load(v, x + r * c, c4);
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < LN_V; k++) s += (v[k].x + v[k].y) + (v[k].z + v[k].w);
    float mu = warp_sum(s) / c, q = 0.f;
#pragma unroll
    for (int k = 0; k < LN_V; k++)
        if (k * 32 + lane < c4) {
            float a = v[k].x - mu, bb = v[k].y - mu, cc = v[k].z - mu, dd = v[k].w - mu;
            q += (a * a + bb * bb) + (cc * cc + dd * dd);
        }
    float rs = rsqrtf(warp_sum(q) / c + eps);
#pragma unroll
    for (int k = 0; k < LN_V; k++) {
        int j = k * 32 + lane;
        if (j >= c4) continue;
        float4 g = ln_param(w, j, 1.f), o = ln_param(b, j, 0.f);
        ((float4*)(y + r * c))[j] = make_float4((v[k].x - mu) * rs * g.x + o.x, (v[k].y - mu) * rs * g.y + o.y,
                                                (v[k].z - mu) * rs * g.z + o.z, (v[k].w - mu) * rs * g.w + o.w);
    }
    if (lane == 0) { mean[r] = mu; rstd[r] = rs; }
}

// ∂x written, or (accumulate) added to dx; with pw, pb, the block's partial sums of ∂w = Σ dy·x̂
// and ∂b = Σ dy over its LN_BWD_ROWS rows into pw[block][c], pb[block][c] (fold_partials adds
// the blocks in order: deterministic). Each warp sums its rows in its own shared-memory row, and
// the block adds its warps' rows in order.
extern "C" __global__ void __launch_bounds__(32 * LN_WARPS)
    layer_norm_backward_rows(float* dx, float* pw, float* pb, const float* x, const float* dy, const float* w,
                             const float* mean, const float* rstd, long rows, int c, int accumulate) {
    __shared__ float4 acc_w[LN_WARPS][32 * LN_V], acc_b[LN_WARPS][32 * LN_V];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, c4 = c >> 2;
    bool params = pw != nullptr;
    if (params)
        for (int j = lane; j < c4; j += 32) acc_w[warp][j] = acc_b[warp][j] = make_float4(0.f, 0.f, 0.f, 0.f);
    long r1 = min(rows, (long)(blockIdx.x + 1) * LN_BWD_ROWS);
    for (long r = (long)blockIdx.x * LN_BWD_ROWS + warp; r < r1; r += LN_WARPS) {
        float4 xv[LN_V], g[LN_V];
        ln_load(xv, x + r * c, c4);
        ln_load(g, dy + r * c, c4);
        float mu = mean[r], rs = rstd[r], sg = 0.f, sgn = 0.f;
#pragma unroll
        for (int k = 0; k < LN_V; k++) {
            int j = k * 32 + lane;
            if (j >= c4) continue;
            // x̂ in place of x; ∂b and ∂w's partial sums take ∂y before the weight
            xv[k] = make_float4((xv[k].x - mu) * rs, (xv[k].y - mu) * rs, (xv[k].z - mu) * rs, (xv[k].w - mu) * rs);
            if (params) {
                float4 a = acc_w[warp][j], bb = acc_b[warp][j];
                acc_w[warp][j] = make_float4(a.x + g[k].x * xv[k].x, a.y + g[k].y * xv[k].y, a.z + g[k].z * xv[k].z,
                                             a.w + g[k].w * xv[k].w);
                acc_b[warp][j] = make_float4(bb.x + g[k].x, bb.y + g[k].y, bb.z + g[k].z, bb.w + g[k].w);
            }
            float4 wt = ln_param(w, j, 1.f);
            g[k] = make_float4(g[k].x * wt.x, g[k].y * wt.y, g[k].z * wt.z, g[k].w * wt.w);
            sg += (g[k].x + g[k].y) + (g[k].z + g[k].w);
            sgn += (g[k].x * xv[k].x + g[k].y * xv[k].y) + (g[k].z * xv[k].z + g[k].w * xv[k].w);
        }
        sg = warp_sum(sg) / c;
        sgn = warp_sum(sgn) / c;
#pragma unroll
        for (int k = 0; k < LN_V; k++) {
            int j = k * 32 + lane;
            if (j >= c4) continue;
            float4 v = make_float4(rs * (g[k].x - sg - xv[k].x * sgn), rs * (g[k].y - sg - xv[k].y * sgn),
                                   rs * (g[k].z - sg - xv[k].z * sgn), rs * (g[k].w - sg - xv[k].w * sgn));
            float4* o = (float4*)(dx + r * c) + j;
            if (accumulate) {
                float4 a = *o;
                v = make_float4(a.x + v.x, a.y + v.y, a.z + v.z, a.w + v.w);
            }
            *o = v;
        }
    }
    if (!params) return;
    __syncthreads();
    for (int j = threadIdx.x; j < c4; j += blockDim.x) {
        float4 tw = acc_w[0][j], tb = acc_b[0][j];
        for (int v = 1; v < LN_WARPS; v++) {
            float4 a = acc_w[v][j], bb = acc_b[v][j];
            tw = make_float4(tw.x + a.x, tw.y + a.y, tw.z + a.z, tw.w + a.w);
            tb = make_float4(tb.x + bb.x, tb.y + bb.y, tb.z + bb.z, tb.w + bb.w);
        }
        ((float4*)(pw + blockIdx.x * (long)c))[j] = tw;
        ((float4*)(pb + blockIdx.x * (long)c))[j] = tb;
    }
}

// parameter gradients: one thread per column, rows in order (deterministic)
// per-split partial sums of ∂w = Σ_r dy·x̂ and ∂b = Σ_r dy (as column_partials), folded by
// fold_partials
extern "C" __global__ void layer_norm_param_partials(float* pw, float* pb, const float* x, const float* dy,
                                                     const float* mean, const float* rstd, long rows, int c, long split) {
    __shared__ float shw[8][33], shb[8][33];
    int j = blockIdx.x * 32 + threadIdx.x;
    long r0 = (long)blockIdx.y * split, r1 = min(rows, r0 + split);
    float sw = 0.f, sb = 0.f;
    if (j < c)
        for (long r = r0 + threadIdx.y; r < r1; r += 8) {
            float g = dy[r * c + j];
            sw += g * (x[r * c + j] - mean[r]) * rstd[r];
            sb += g;
        }
    shw[threadIdx.y][threadIdx.x] = sw;
    shb[threadIdx.y][threadIdx.x] = sb;
    __syncthreads();
    if (threadIdx.y == 0 && j < c) {
        float tw = 0.f, tb = 0.f;
        for (int y = 0; y < 8; y++) { tw += shw[y][threadIdx.x]; tb += shb[y][threadIdx.x]; }
        pw[blockIdx.y * (long)c + j] = tw;
        pb[blockIdx.y * (long)c + j] = tb;
    }
}

// ---- embedding ---------------------------------------------------------------------------------
extern "C" __global__ void embedding_forward(float* out, const float* table, const unsigned* ids, long n, int c) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n * c) out[i] = table[(long)ids[i / c] * c + i % c];
}

// ∂table[ids[r]] += ∂out[r], deterministically: the host groups the rows by id (uniq: the
// distinct ids, rows[offsets[u]..offsets[u+1]]: the rows of uniq[u], ascending), and each
// block adds one id's rows in that order — no float atomics, so every run sums alike.
// grid (distinct ids, ceil(c / BLOCK)).
extern "C" __global__ void embedding_backward(float* dtable, const unsigned* uniq, const unsigned* offsets,
                                              const unsigned* rows, const float* dout, int c) {
    int u = blockIdx.x, j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float s = 0.f;
    for (unsigned i = offsets[u]; i < offsets[u + 1]; i++) s += dout[(long)rows[i] * c + j];
    dtable[(long)uniq[u] * c + j] += s;
}

// ---- rotary --------------------------------------------------------------------------------------
extern "C" __global__ void rotary_forward(float* y, const float* x, const float* ang, long rows, int d) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;  // one thread per pair
    int half = d / 2;
    if (i >= rows * half) return;
    long r = i / half; int p = i % half;
    float s, c; sincosf(ang[i], &s, &c);
    float a = x[r * d + 2 * p], b = x[r * d + 2 * p + 1];
    y[r * d + 2 * p] = a * c - b * s;
    y[r * d + 2 * p + 1] = a * s + b * c;
}

extern "C" __global__ void rotary_backward(float* dx, float* dang, const float* dy, const float* y, const float* ang, long rows, int d) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    int half = d / 2;
    if (i >= rows * half) return;
    long r = i / half; int p = i % half;
    float s, c; sincosf(ang[i], &s, &c);
    float ga = dy[r * d + 2 * p], gb = dy[r * d + 2 * p + 1];
    dx[r * d + 2 * p] = ga * c + gb * s;
    dx[r * d + 2 * p + 1] = -ga * s + gb * c;
    dang[i] = -ga * y[r * d + 2 * p + 1] + gb * y[r * d + 2 * p];
}

// The attention's inputs from the fused q/k/v projection's output qkv [rows, W] (q, k and v in
// columns [0, c), [c, 2c) and [2c, 3c), c = heads·d) in one pass, a thread per rotary pair i of a
// row: q and k rotated by ang [rows, c/2] when given (as rotary_forward, one sincos for both), v
// copied; the row's first G threads also copy the gate's logits (columns g0 …) and write their
// logsigmoid (as log_gate_forward). The other columns (rotary logits, padding) are not read.
extern "C" __global__ void qkv_rotary_gate_forward(float* qr, float* kr, float* v, float* glog, float* lg,
                                                   const float* qkv, const float* ang, long rows, int W, int c,
                                                   int g0, int G) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    int half = c / 2;
    if (i >= rows * half) return;
    long r = i / half; int p = i % half;
    const float* row = qkv + r * W;
    float q0 = row[2 * p], q1 = row[2 * p + 1], k0 = row[c + 2 * p], k1 = row[c + 2 * p + 1];
    v[2 * i] = row[2 * c + 2 * p];
    v[2 * i + 1] = row[2 * c + 2 * p + 1];
    if (ang) {
        float s, co; sincosf(ang[i], &s, &co);
        qr[2 * i] = q0 * co - q1 * s;
        qr[2 * i + 1] = q0 * s + q1 * co;
        kr[2 * i] = k0 * co - k1 * s;
        kr[2 * i + 1] = k0 * s + k1 * co;
    } else {
        qr[2 * i] = q0, qr[2 * i + 1] = q1, kr[2 * i] = k0, kr[2 * i + 1] = k1;
    }
    if (p < G) {
        float a = row[g0 + p];
        double x = a;
        glog[r * G + p] = a;
        lg[r * G + p] = (float)(x < -30.0 ? x : -log1p(exp(-x)));
    }
}

// Backward of qkv_rotary_gate_forward with rotation, a thread per rotary pair i: ∂q and ∂k as
// rotary_backward gives them, ∂angles q's part plus k's; with a gate (glog non-null), threads
// i < ng also write the gate logits' gradient, as log_gate_backward does (ng ≤ pairs).
extern "C" __global__ void qkv_rotary_gate_backward(float* dq, float* dk, float* dang, float* dglog, const float* dqr,
                                                    const float* dkr, const float* qr, const float* kr,
                                                    const float* ang, const float* glog, const float* dlg, long pairs,
                                                    long ng) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= pairs) return;
    float s, co; sincosf(ang[i], &s, &co);
    float ga = dqr[2 * i], gb = dqr[2 * i + 1];
    dq[2 * i] = ga * co + gb * s;
    dq[2 * i + 1] = -ga * s + gb * co;
    float da = -ga * qr[2 * i + 1] + gb * qr[2 * i];
    ga = dkr[2 * i], gb = dkr[2 * i + 1];
    dk[2 * i] = ga * co + gb * s;
    dk[2 * i + 1] = -ga * s + gb * co;
    float dak = -ga * kr[2 * i + 1] + gb * kr[2 * i];
    dang[i] = da + dak;
    if (glog && i < ng) dglog[i] = dlg[i] * (float)(1.0 / (1.0 + exp((double)glog[i])));
}

#define TAU 6.283185307179586

extern "C" __global__ void fixed_rotary_angles(float* out, int batch, int time, int heads, int half, double base, long start) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    long n = (long)batch * time * heads * half;
    if (i >= n) return;
    int k = i % half;
    long t = (i / half / heads) % time;
    double w = pow(base, -2.0 * k / (2.0 * half));
    out[i] = (float)fmod((double)(t + start) * w, TAU);
}

__device__ double softplus_d(double x) { return x > 20.0 ? x : log1p(exp(x)); }

// The learned rotary's angles are a running sum over time, so both directions are scans, each
// over time slices a block each (below). In the backward each thread of a block takes a
// contiguous segment of its slice, sums it, the block scans the segment sums (in double, thread
// 0: 256 additions), and each thread walks its segment again writing the results.
#define SCAN_THREADS 256

// exclusive prefix sums of the threads' segment totals, in place in shm (forward or reverse)
__device__ double scan_offset(double total, double* shm, bool reverse) {
    shm[threadIdx.x] = total;
    __syncthreads();
    if (threadIdx.x == 0) {
        double run = 0.0;
        for (int i = 0; i < SCAN_THREADS; i++) {
            int j = reverse ? SCAN_THREADS - 1 - i : i;
            double v = shm[j];
            shm[j] = run;
            run += v;
        }
    }
    __syncthreads();
    return shm[threadIdx.x];
}

__device__ void rotary_frequencies(double* w, int half, double base) {
    // ω_k = base^(−2k/d); pow is slow, so once per block
    if (threadIdx.x < half) w[threadIdx.x] = pow(base, -2.0 * threadIdx.x / (2.0 * half));
    __syncthreads();
}

// angle_t = (start + Σ_{s≤t} ω_k·softplus(a_s)) mod 2π. Block (batch·head, slice of `span` time
// steps), as the backward: one scan per (batch, head, frequency) is too few blocks and, walking
// one frequency's column, writes 4 bytes a row. Here lane = frequency (k and k + 32 for half =
// 64), so each row of angles is written whole, and each of the 8 warps takes a contiguous part
// of the slice; learned_rotary_angle_slice_sums gives every slice the sums of the slices before
// it (in double, in a fixed order: deterministic).
#define ROT_WARPS 8
#define ROT_KMAX 2  // half ≤ 64 (head_dim ≤ 128)
struct AngleSlice {
    int b, h, lane, warp;
    long t0, t1;  // this warp's part of the block's slice
    __device__ AngleSlice(int heads, int time, int span) {
        b = blockIdx.x / heads; h = blockIdx.x % heads;
        lane = threadIdx.x & 31; warp = threadIdx.x >> 5;
        long begin = (long)blockIdx.y * span, end = min((long)time, begin + span);
        long part = (end - begin + ROT_WARPS - 1) / ROT_WARPS;
        t0 = min(end, begin + warp * part); t1 = min(end, t0 + part);
    }
    __device__ long row(long t, int time, int heads) const { return ((long)b * time + t) * heads + h; }
};

// Walks this warp's part of the slice in order, calling f(row, m, k, ω_k·softplus(a)) for each
// row and each frequency k = lane + 32m of the lane. softplus (in double, ~hundreds of
// instructions) is the cost: a per-head logit is shared by every frequency, so each lane
// computes it for one of 32 rows and the warp passes the values round.
template <typename F>
__device__ __forceinline__ void angle_steps(const AngleSlice& sl, const float* logits, const double* w, int time,
                                            int heads, int half, int r, F f) {
    for (long c = sl.t0; c < sl.t1; c += 32) {
        int n = (int)min(32L, sl.t1 - c);
        double own = r == 1 && sl.lane < n ? softplus_d((double)logits[sl.row(c + sl.lane, time, heads)]) : 0.0;
        for (int j = 0; j < n; j++) {
            long row = sl.row(c + j, time, heads);
            double shared = __shfl_sync(0xffffffffu, own, j);
#pragma unroll
            for (int m = 0; m < ROT_KMAX; m++) {
                int k = sl.lane + 32 * m;
                if (k >= half) continue;
                double sp = r == 1 ? shared : softplus_d((double)logits[row * r + k]);
                f(row, m, k, w[k] * sp);
            }
        }
    }
}

// each warp's Σ over its part, per frequency, into ws[warp][k]
__device__ void angle_part_sums(double (*ws)[64], const AngleSlice& sl, const float* logits, const double* w,
                                int time, int heads, int half, int r) {
    double s[ROT_KMAX] = {0.0, 0.0};
    angle_steps(sl, logits, w, time, heads, half, r, [&](long, int m, int, double x) { s[m] += x; });
#pragma unroll
    for (int m = 0; m < ROT_KMAX; m++)
        if (sl.lane + 32 * m < half) ws[sl.warp][sl.lane + 32 * m] = s[m];
    __syncthreads();
}

extern "C" __global__ void learned_rotary_angle_slice_sums(double* part, const float* logits, int batch, int time,
                                                           int heads, int half, int r, double base, int span) {
    __shared__ double w[64];
    __shared__ double ws[ROT_WARPS][64];
    rotary_frequencies(w, half, base);
    AngleSlice sl(heads, time, span);
    angle_part_sums(ws, sl, logits, w, time, heads, half, r);
    if (threadIdx.x < half) {
        double tot = 0.0;
        for (int i = 0; i < ROT_WARPS; i++) tot += ws[i][threadIdx.x];
        part[((long)blockIdx.x * gridDim.y + blockIdx.y) * half + threadIdx.x] = tot;
    }
}

extern "C" __global__ void learned_rotary_angles(float* out, const float* logits, const float* start, const double* part,
                                                 int batch, int time, int heads, int half, int r, double base, int span) {
    __shared__ double w[64];
    __shared__ double ws[ROT_WARPS][64];
    rotary_frequencies(w, half, base);
    AngleSlice sl(heads, time, span);
    angle_part_sums(ws, sl, logits, w, time, heads, half, r);
    // each lane's angles enter its part reduced mod 2π and stay so, as the CPU op keeps them
    double acc[ROT_KMAX] = {0.0, 0.0};
#pragma unroll
    for (int m = 0; m < ROT_KMAX; m++) {
        int k = sl.lane + 32 * m;
        if (k >= half) continue;
        double a = start ? (double)start[((long)sl.b * heads + sl.h) * half + k] : 0.0;
        for (int s = 0; s < (int)blockIdx.y; s++) a += part[((long)blockIdx.x * gridDim.y + s) * half + k];
        for (int i = 0; i < sl.warp; i++) a += ws[i][k];
        acc[m] = fmod(a, TAU);
    }
    angle_steps(sl, logits, w, time, heads, half, r, [&](long row, int m, int k, double x) {
        acc[m] = fmod(acc[m] + x, TAU);
        out[row * half + k] = (float)acc[m];
    });
}

// ∂a_t = sigmoid(a_t)·Σ_{k∈K} ω_k·Σ_{s≥t} ∂angle_{s,k}, K the frequencies logit a drives (one,
// or all for a per-head logit): a reverse scan of u_s = Σ_{k∈K} ω_k ∂angle_{s,k}. One scan per
// (batch, head, logit) is too few blocks to fill the GPU (12 for gpt2-124m's per-head logits), so
// time is cut into gridDim.y slices of `span` steps, a block each: learned_rotary_slice_sums
// writes each slice's Σ u, and the backward starts each slice from the sums of the slices after
// it (in double, in a fixed order: deterministic).
struct RotaryScan {
    int k0, k1, kk, h, b;
    long t_begin, t_end;  // this block's slice of time
    __device__ RotaryScan(int heads, int half, int r, int time, int span) {
        long i = blockIdx.x;
        kk = i % r; h = (i / r) % heads; b = i / r / heads;
        k0 = r == 1 ? 0 : kk; k1 = r == 1 ? half : kk + 1;
        t_begin = (long)blockIdx.y * span;
        t_end = min((long)time, t_begin + span);
    }
    // this thread's contiguous segment of the slice
    __device__ void segment(long& t0, long& t1) const {
        long seg = (t_end - t_begin + SCAN_THREADS - 1) / SCAN_THREADS;
        t0 = min(t_end, t_begin + threadIdx.x * seg); t1 = min(t_end, t0 + seg);
    }
};

__device__ __forceinline__ double rotary_u(const float* dang, const double* w, long row, int half, int k0, int k1) {
    double u = 0.0;
    for (int k = k0; k < k1; k++) u += w[k] * dang[row * half + k];
    return u;
}

extern "C" __global__ void learned_rotary_slice_sums(double* part, const float* dang, int batch, int time, int heads,
                                                     int half, int r, double base, int span) {
    __shared__ double shm[SCAN_THREADS];
    __shared__ double w[64];  // half ≤ 64 (head_dim ≤ 128)
    rotary_frequencies(w, half, base);
    RotaryScan sc(heads, half, r, time, span);
    long t0, t1;
    sc.segment(t0, t1);
    double sum = 0.0;
    for (long t = t0; t < t1; t++) sum += rotary_u(dang, w, ((long)sc.b * time + t) * heads + sc.h, half, sc.k0, sc.k1);
    double before = scan_offset(sum, shm, false);
    if (threadIdx.x == SCAN_THREADS - 1) part[(long)blockIdx.x * gridDim.y + blockIdx.y] = before + sum;
}

extern "C" __global__ void learned_rotary_angles_backward(float* dlogits, const float* logits, const float* dang,
                                                          const double* part, int batch, int time, int heads,
                                                          int half, int r, double base, int span) {
    __shared__ double shm[SCAN_THREADS];
    __shared__ double w[64];
    rotary_frequencies(w, half, base);
    RotaryScan sc(heads, half, r, time, span);
    long t0, t1;
    sc.segment(t0, t1);
    double later = 0.0;  // Σ u over the slices after this one
    for (int s = gridDim.y - 1; s > (int)blockIdx.y; s--) later += part[(long)blockIdx.x * gridDim.y + s];
    double sum = 0.0;
    for (long t = t0; t < t1; t++) sum += rotary_u(dang, w, ((long)sc.b * time + t) * heads + sc.h, half, sc.k0, sc.k1);
    double acc = scan_offset(sum, shm, true) + later;
    for (long t = t1 - 1; t >= t0; t--) {
        long row = ((long)sc.b * time + t) * heads + sc.h;
        acc += rotary_u(dang, w, row, half, sc.k0, sc.k1);
        double a = logits[row * r + sc.kk];
        dlogits[row * r + sc.kk] = (float)(acc / (1.0 + exp(-a)));
    }
}

// ---- gate ------------------------------------------------------------------------------------------
extern "C" __global__ void log_gate_forward(float* g, const float* a, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    double x = a[i];
    g[i] = (float)(x < -30.0 ? x : -log1p(exp(-x)));
}

extern "C" __global__ void log_gate_backward(float* da, const float* a, const float* dg, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    da[i] = dg[i] * (float)(1.0 / (1.0 + exp((double)a[i])));
}

// ---- cross-entropy: one block per row ----------------------------------------------------------
// Rows are `row_len` long, the distribution their first `vocab` columns (the rest is the LM head's
// alignment padding). Where rows are 16-byte aligned (row_len a multiple of 4, as the model's
// padded LM head makes them) both passes move float4s.
__device__ __forceinline__ void lse_push(float v, float& m, float& s) {
    // a running max per thread, the sum rescaled when the max moves: one exp per element
    if (v > m) { s = s * __expf(m - v) + 1.f; m = v; } else s += __expf(v - m);
}

// ln Σ_{j<vocab} exp(row_j) in one pass over the row
__device__ float row_logsumexp(const float* row, int vocab, int row_len, float* shm) {
    float m = __int_as_float(0xff800000), s = 0.f;
    int j0 = 0;
    if ((row_len & 3) == 0) {
        const float4* r4 = (const float4*)row;
        for (int j = threadIdx.x; j < vocab >> 2; j += blockDim.x) {
            float4 v = r4[j];
            lse_push(v.x, m, s); lse_push(v.y, m, s); lse_push(v.z, m, s); lse_push(v.w, m, s);
        }
        j0 = vocab & ~3;
    }
    for (int j = j0 + threadIdx.x; j < vocab; j += blockDim.x) lse_push(row[j], m, s);
    float mb = block_max(m, shm);
    s = m == __int_as_float(0xff800000) ? 0.f : s * __expf(m - mb);
    return mb + logf(block_sum(s, shm));
}

extern "C" __global__ void cross_entropy_forward(float* loss, const float* logits, const unsigned* targets, int vocab,
                                                 int row_len) {
    __shared__ float shm[32];
    long r = blockIdx.x;
    unsigned t = targets[r];
    const float* row = logits + r * row_len;
    float lse = row_logsumexp(row, vocab, row_len, shm);
    if (threadIdx.x == 0) loss[r] = t == 0xffffffffu ? 0.f : lse - row[t];
}

// Stores of a row of ∂logits: f32, or bf16 for the LM head's products (classifier_backward).
__device__ __forceinline__ void put4(float* d, int j4, float4 v) { ((float4*)d)[j4] = v; }
__device__ __forceinline__ void put4(unsigned short* d, int j4, float4 v) {
    ((uint2*)d)[j4] = make_uint2(bf16_bits(v.x) | (bf16_bits(v.y) << 16), bf16_bits(v.z) | (bf16_bits(v.w) << 16));
}
__device__ __forceinline__ void put1(float* d, int j, float v) { d[j] = v; }
__device__ __forceinline__ void put1(unsigned short* d, int j, float v) { d[j] = (unsigned short)bf16_bits(v); }

// dloss·(softmax − onehot) over the vocabulary, 0 in the padding; the row's log-sum-exp is the
// forward's loss + logit[target], so the logits are read once
template <typename T>
__device__ void ce_backward(T* d, const float* logits, const unsigned* targets, const float* losses, const float* dloss,
                            int vocab, int row_len) {
    long r = blockIdx.x;
    unsigned t = targets[r];
    const float* row = logits + r * row_len;
    T* dr = d + r * row_len;
    bool skip = t == 0xffffffffu;
    float g = skip ? 0.f : dloss[r], lse = skip ? 0.f : losses[r] + row[t];
    auto grad = [&](int j, float x) { return j < vocab && !skip ? g * __expf(x - lse) - (j == (int)t ? g : 0.f) : 0.f; };
    int j0 = 0;
    if ((row_len & 3) == 0) {
        const float4* r4 = (const float4*)row;
        for (int j = threadIdx.x; j < row_len >> 2; j += blockDim.x) {
            float4 x = r4[j];
            int c = 4 * j;
            put4(dr, j, make_float4(grad(c, x.x), grad(c + 1, x.y), grad(c + 2, x.z), grad(c + 3, x.w)));
        }
        j0 = row_len;
    }
    for (int j = j0 + threadIdx.x; j < row_len; j += blockDim.x) put1(dr, j, grad(j, row[j]));
}
extern "C" __global__ void cross_entropy_backward(float* d, const float* logits, const unsigned* targets,
                                                  const float* losses, const float* dloss, int vocab, int row_len) {
    ce_backward(d, logits, targets, losses, dloss, vocab, row_len);
}
extern "C" __global__ void cross_entropy_backward_bf16(unsigned short* d, const float* logits, const unsigned* targets,
                                                       const float* losses, const float* dloss, int vocab,
                                                       int row_len) {
    ce_backward(d, logits, targets, losses, dloss, vocab, row_len);
}

// ---- AdamW: one chunk of one parameter tensor a block (see SquaresChunk) ------------------------
struct AdamWChunk {
    float* p;
    const float* g;
    float* m;
    float* v;
    long long n;
    float lr, wd;
};

extern "C" __global__ void adamw_step(const AdamWChunk* chunks, float b1, float b2, float eps, float bc1, float bc2,
                                      float gscale) {
    AdamWChunk c = chunks[blockIdx.x];
    for (long long i = threadIdx.x; i < c.n; i += blockDim.x) {
        float gi = c.g[i];
        if (gscale != 1.f) gi *= gscale;  // global-norm clipping, as the CPU op
        float mi = b1 * c.m[i] + (1.f - b1) * gi;
        float vi = b2 * c.v[i] + (1.f - b2) * gi * gi;
        c.m[i] = mi; c.v[i] = vi;
        float x = c.p[i];
        c.p[i] = x - c.lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + c.wd * x);
    }
}

// bf16 copies of matrix-product operands, four a thread (bf16_bits above).
extern "C" __global__ void f32_to_bf16(unsigned short* out, const float* in, long n) {
    long i = (blockIdx.x * (long)blockDim.x + threadIdx.x) * 4;
    if (i >= n) return;
    if (i + 3 < n) {
        float4 v = *(const float4*)(in + i);
        *(uint2*)(out + i) = make_uint2(bf16_bits(v.x) | (bf16_bits(v.y) << 16), bf16_bits(v.z) | (bf16_bits(v.w) << 16));
    } else {
        for (; i < n; i++) out[i] = (unsigned short)bf16_bits(in[i]);
    }
}

// How many of n bf16 values are not finite (exponent bits all ones: ±inf or NaN), into *count.
extern "C" __global__ void count_non_finite_bf16(unsigned int* count, const unsigned short* x, long n) {
    unsigned int bad = 0;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        bad += (x[i] & 0x7f80u) == 0x7f80u;
    for (int o = 16; o > 0; o >>= 1) bad += __shfl_xor_sync(0xffffffffu, bad, o);
    if ((threadIdx.x & 31) == 0 && bad) atomicAdd(count, bad);
}

// ---- GELU on bf16 (the MLP's hidden layer under bf16 products): f32 arithmetic as above, the
// result rounded as f32_to_bf16 rounds; two elements a thread ----------------------------------
__device__ __forceinline__ float bf16_value(unsigned int bits) { return __uint_as_float(bits << 16); }
extern "C" __global__ void gelu_forward_bf16(unsigned short* y, const unsigned short* x, long n) {
    long i = (blockIdx.x * (long)blockDim.x + threadIdx.x) * 2;
    if (i + 1 < n) {
        unsigned int v = *(const unsigned int*)(x + i);
        *(unsigned int*)(y + i) = bf16_bits(gelu_value(bf16_value(v & 0xffffu))) |
                                  (bf16_bits(gelu_value(bf16_value(v >> 16))) << 16);
    } else if (i < n) {
        y[i] = (unsigned short)bf16_bits(gelu_value(bf16_value(x[i])));
    }
}
extern "C" __global__ void gelu_backward_bf16(unsigned short* dx, const unsigned short* x, const unsigned short* dy,
                                              long n) {
    long i = (blockIdx.x * (long)blockDim.x + threadIdx.x) * 2;
    if (i + 1 < n) {
        unsigned int v = *(const unsigned int*)(x + i), d = *(const unsigned int*)(dy + i);
        *(unsigned int*)(dx + i) = bf16_bits(gelu_grad(bf16_value(v & 0xffffu), bf16_value(d & 0xffffu))) |
                                   (bf16_bits(gelu_grad(bf16_value(v >> 16), bf16_value(d >> 16))) << 16);
    } else if (i < n) {
        dx[i] = (unsigned short)bf16_bits(gelu_grad(bf16_value(x[i]), bf16_value(dy[i])));
    }
}
