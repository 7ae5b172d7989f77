// Element-wise and per-row ops of the CUDA backend, each the GPU twin of the CPU op of the
// same name in crates/sympow/src/ops (the reference they are tested against on the device).
// f32 storage, f32 arithmetic; per-row reductions accumulate in f32 within a block.
// Compiled at run time by NVRTC.

#define BLOCK 256

__device__ float block_sum(float v, float* shm) {
    // sum over the block's threads; every thread gets the total
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
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

extern "C" __global__ void scale(float* dst, float s, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n) dst[i] *= s;
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
extern "C" __global__ void sum_rows(float* out, const float* x, long rows, int c) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float s = 0.f;
    for (long r = 0; r < rows; r++) s += x[r * c + j];
    out[j] = s;
}

// per-block partial sums of squares, in double
extern "C" __global__ void sum_squares(double* partial, const float* x, long n) {
    __shared__ double shm[BLOCK];
    double s = 0.0;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        double v = x[i];
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

// copy a column block [col0, col0+w) of x [rows, total] into out [rows, w], or back (dir = 1)
extern "C" __global__ void copy_columns(float* out, const float* x, long rows, int total, int col0, int w, int dir) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= rows * w) return;
    long r = i / w; int j = i % w;
    if (dir == 0) out[i] = x[r * total + col0 + j];
    else out[r * total + col0 + j] = x[i];
}

extern "C" __global__ void fill_rows(float* out, const float* bias, long rows, int c) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < rows * c) out[i] = bias[i % c];
}

// ---- GELU (tanh approximation) -----------------------------------------------------------
#define GELU_K 0.7978845608028654f
__device__ float tanh_exp(float u) { return 1.f - 2.f / (1.f + __expf(2.f * u)); }

extern "C" __global__ void gelu_forward(float* y, const float* x, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = x[i];
    y[i] = 0.5f * v * (1.f + tanh_exp(GELU_K * (v + 0.044715f * v * v * v)));
}

extern "C" __global__ void gelu_backward(float* dx, const float* x, const float* dy, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = x[i];
    float th = tanh_exp(GELU_K * (v + 0.044715f * v * v * v));
    float du = GELU_K * (1.f + 3.f * 0.044715f * v * v);
    dx[i] = dy[i] * (0.5f * (1.f + th) + 0.5f * v * (1.f - th * th) * du);
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

extern "C" __global__ void layer_norm_backward(float* dx, const float* x, const float* dy, const float* w,
                                               const float* mean, const float* rstd, int c) {
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
        dx[r * c + j] = rs * (g - sg / c - n * sgn / c);
    }
}

// parameter gradients: one thread per column, rows in order (deterministic)
extern "C" __global__ void layer_norm_param_grads(float* dw, float* db, const float* x, const float* dy,
                                                  const float* mean, const float* rstd, long rows, int c) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float sw = 0.f, sb = 0.f;
    for (long r = 0; r < rows; r++) {
        float g = dy[r * c + j];
        sw += g * (x[r * c + j] - mean[r]) * rstd[r];
        sb += g;
    }
    if (dw) dw[j] += sw;
    if (db) db[j] += sb;
}

// ---- embedding ---------------------------------------------------------------------------------
extern "C" __global__ void embedding_forward(float* out, const float* table, const unsigned* ids, long n, int c) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n * c) out[i] = table[(long)ids[i / c] * c + i % c];
}

// one thread per column of each distinct row would need sorting; atomics keep it simple
// (float atomics make the GPU embedding gradient's summation order, and so its last bits, vary)
extern "C" __global__ void embedding_backward(float* dtable, const unsigned* ids, const float* dout, long n, int c) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n * c) atomicAdd(&dtable[(long)ids[i / c] * c + i % c], dout[i]);
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

// one thread per (batch, head, frequency): a sequential scan over time, in double
extern "C" __global__ void learned_rotary_angles(float* out, const float* logits, const float* start,
                                                 int batch, int time, int heads, int half, int r, double base) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= (long)batch * heads * half) return;
    int k = i % half; int h = (i / half) % heads; int b = i / half / heads;
    double w = pow(base, -2.0 * k / (2.0 * half));
    double acc = start ? (double)start[((long)b * heads + h) * half + k] : 0.0;
    for (int t = 0; t < time; t++) {
        long row = ((long)b * time + t) * heads + h;
        acc = fmod(acc + w * softplus_d((double)logits[row * r + (r == 1 ? 0 : k)]), TAU);
        out[row * half + k] = (float)acc;
    }
}

// reverse scan; per-frequency logits get their own gradient, per-head logits sum over frequencies
extern "C" __global__ void learned_rotary_angles_backward(float* dlogits, const float* logits, const float* dang,
                                                          int batch, int time, int heads, int half, int r, double base) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= (long)batch * heads * r) return;
    int kk = i % r; int h = (i / r) % heads; int b = i / r / heads;
    int k0 = r == 1 ? 0 : kk, k1 = r == 1 ? half : kk + 1;
    double acc[64], w[64];  // half ≤ 64 (head_dim ≤ 128)
    for (int k = k0; k < k1; k++) {
        acc[k - k0] = 0.0;
        w[k - k0] = pow(base, -2.0 * k / (2.0 * half));  // out of the time loop: pow is slow
    }
    for (int t = time - 1; t >= 0; t--) {
        long row = ((long)b * time + t) * heads + h;
        double a = logits[row * r + kk];
        double sig = 1.0 / (1.0 + exp(-a));
        double g = 0.0;
        for (int k = k0; k < k1; k++) {
            acc[k - k0] += dang[row * half + k];
            g += acc[k - k0] * w[k - k0];
        }
        dlogits[row * r + kk] = (float)(g * sig);
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
extern "C" __global__ void cross_entropy_forward(float* loss, const float* logits, const unsigned* targets, int vocab) {
    __shared__ float shm[32];
    long r = blockIdx.x;
    unsigned t = targets[r];
    const float* row = logits + r * vocab;
    float m = __int_as_float(0xff800000);
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_max(m, shm);
    float s = 0.f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += __expf(row[j] - m);
    s = block_sum(s, shm);
    if (threadIdx.x == 0) loss[r] = t == 0xffffffffu ? 0.f : m + logf(s) - row[t];
}

extern "C" __global__ void cross_entropy_backward(float* d, const float* logits, const unsigned* targets, const float* dloss, int vocab) {
    __shared__ float shm[32];
    long r = blockIdx.x;
    unsigned t = targets[r];
    const float* row = logits + r * vocab;
    float* dr = d + r * vocab;
    if (t == 0xffffffffu) {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) dr[j] = 0.f;
        return;
    }
    float m = __int_as_float(0xff800000);
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_max(m, shm);
    float s = 0.f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += __expf(row[j] - m);
    float lse = m + logf(block_sum(s, shm));
    float g = dloss[r];
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) dr[j] = g * __expf(row[j] - lse) - (j == (int)t ? g : 0.f);
}

// ---- AdamW -------------------------------------------------------------------------------------------
extern "C" __global__ void adamw_step(float* p, const float* g, float* m, float* v, long n, float lr, float b1, float b2,
                                      float eps, float wd, float bc1, float bc2) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i];
    float mi = b1 * m[i] + (1.f - b1) * gi;
    float vi = b2 * v[i] + (1.f - b2) * gi * gi;
    m[i] = mi; v[i] = vi;
    float x = p[i];
    p[i] = x - lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + wd * x);
}
