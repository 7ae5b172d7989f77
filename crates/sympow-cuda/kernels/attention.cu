// Quadratic-form gated attention on the GPU, the twin of crates/sympow/src/attention/
// quadratic.rs: one thread per query (forward, dq) or per key (dk, dv), a loop over the other
// side. O(T²·d) on CUDA cores, no tensor cores: correct and simple, for short contexts and as
// the GPU reference that fused kernels are checked against. Not the fast path.
//
// Layout: q, k [B, T, H, d]; v, y, dy [B, T, H, e]; g, log_norm [B, T, H]. power = 0 means
// softmax (ℓ = σ q·k); otherwise ℓ = p·ln|σ q·k| + Σ_{s<r≤t} g_r. Gate sums are kept in double.

#define MAXE 256

__device__ __forceinline__ float log_weight(float dot, float scale, int power, double decay) {
    float s = scale * dot;
    if (power == 0) return s;
    return (float)power * logf(fabsf(s)) + (float)decay;
}

extern "C" __global__ void attention_forward(float* y, float* log_norm, const float* q, const float* k, const float* v,
                                             const float* g, int B, int T, int H, int d, int e, float scale, int power, float eps) {
    long idx = blockIdx.x * (long)blockDim.x + threadIdx.x;  // (b, t, h)
    if (idx >= (long)B * T * H) return;
    int h = idx % H; int t = (idx / H) % T; int b = idx / H / T;
    const float* qt = q + idx * d;
    float num[MAXE];
    for (int c = 0; c < e; c++) num[c] = 0.f;
    float m = __int_as_float(0xff800000), den = 0.f;
    double decay = 0.0;
    for (int s = t; s >= 0; s--) {
        long ks = ((long)(b * T + s) * H + h);
        float dot = 0.f;
        for (int j = 0; j < d; j++) dot += qt[j] * k[ks * d + j];
        float l = log_weight(dot, scale, power, decay);
        if (g) decay += g[ks];
        if (l == __int_as_float(0xff800000)) continue;
        if (l > m) {  // rescale what was accumulated to the new maximum
            float r = __expf(m - l);
            den *= r;
            for (int c = 0; c < e; c++) num[c] *= r;
            m = l;
        }
        float w = __expf(l - m);
        den += w;
        for (int c = 0; c < e; c++) num[c] += w * v[ks * e + c];
    }
    if (!(m > __int_as_float(0xff800000))) m = 0.f;
    float z = den + eps * __expf(-m);
    for (int c = 0; c < e; c++) y[idx * e + c] = num[c] / z;
    log_norm[idx] = m + logf(z);
}

// D_t = dy_t · y_t
extern "C" __global__ void attention_row_dot(float* D, const float* dy, const float* y, long rows, int e) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= rows) return;
    float s = 0.f;
    for (int c = 0; c < e; c++) s += dy[i * e + c] * y[i * e + c];
    D[i] = s;
}

// dℓ/d(q·k) for a log-weight: p/(q·k) for the power kernel, σ for softmax
__device__ __forceinline__ float dlog_ddot(float dot, float scale, int power) {
    return power == 0 ? scale : (float)power / dot;
}

// one thread per query: dq and the query side of ∂L/∂G
extern "C" __global__ void attention_backward_dq(float* dq, float* dG, const float* q, const float* k, const float* v,
                                                 const float* g, const float* log_norm, const float* dy, const float* D,
                                                 int B, int T, int H, int d, int e, float scale, int power) {
    long idx = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (idx >= (long)B * T * H) return;
    int h = idx % H; int t = (idx / H) % T; int b = idx / H / T;
    const float* qt = q + idx * d;
    float acc[MAXE];
    for (int j = 0; j < d; j++) acc[j] = 0.f;
    float dg = 0.f, ln = log_norm[idx], Dt = D[idx];
    double decay = 0.0;
    for (int s = t; s >= 0; s--) {
        long ks = ((long)(b * T + s) * H + h);
        float dot = 0.f, dp = 0.f;
        for (int j = 0; j < d; j++) dot += qt[j] * k[ks * d + j];
        for (int c = 0; c < e; c++) dp += dy[idx * e + c] * v[ks * e + c];
        float l = log_weight(dot, scale, power, decay);
        if (g) decay += g[ks];
        float a = __expf(l - ln);
        if (a == 0.f) continue;
        float dl = a * (dp - Dt);
        dg += dl;
        float ds = dl * dlog_ddot(dot, scale, power);
        for (int j = 0; j < d; j++) acc[j] += ds * k[ks * d + j];
    }
    for (int j = 0; j < d; j++) dq[idx * d + j] = acc[j];
    dG[idx] = dg;
}

// one thread per key: dk, dv and the key side of ∂L/∂G (added into dG)
extern "C" __global__ void attention_backward_dkv(float* dk, float* dv, float* dG, const float* q, const float* k, const float* v,
                                                  const float* g, const float* log_norm, const float* dy, const float* D,
                                                  int B, int T, int H, int d, int e, float scale, int power) {
    long idx = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (idx >= (long)B * T * H) return;
    int h = idx % H; int s = (idx / H) % T; int b = idx / H / T;
    const float* ks = k + idx * d;
    float ak[MAXE], av[MAXE];
    for (int j = 0; j < d; j++) ak[j] = 0.f;
    for (int c = 0; c < e; c++) av[c] = 0.f;
    float dg = 0.f;
    double decay = 0.0;  // Σ_{s<r≤t} g_r
    for (int t = s; t < T; t++) {
        long qi = ((long)(b * T + t) * H + h);
        if (g && t > s) decay += g[qi];
        float dot = 0.f, dp = 0.f;
        for (int j = 0; j < d; j++) dot += q[qi * d + j] * ks[j];
        for (int c = 0; c < e; c++) dp += dy[qi * e + c] * v[idx * e + c];
        float a = __expf(log_weight(dot, scale, power, decay) - log_norm[qi]);
        if (a == 0.f) continue;
        for (int c = 0; c < e; c++) av[c] += a * dy[qi * e + c];
        float dl = a * (dp - D[qi]);
        dg -= dl;
        float ds = dl * dlog_ddot(dot, scale, power);
        for (int j = 0; j < d; j++) ak[j] += ds * q[qi * d + j];
    }
    for (int j = 0; j < d; j++) dk[idx * d + j] = ak[j];
    for (int c = 0; c < e; c++) dv[idx * e + c] = av[c];
    dG[idx] += dg;
}

// ∂L/∂g_r = Σ_{t ≥ r} ∂L/∂G_t: one thread per (b, h), a reverse scan in double
extern "C" __global__ void reverse_cumsum_time(float* out, const float* dG, int B, int T, int H) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i >= (long)B * H) return;
    int h = i % H; int b = i / H;
    double acc = 0.0;
    for (int t = T - 1; t >= 0; t--) {
        long r = (long)(b * T + t) * H + h;
        acc += dG[r];
        out[r] = (float)acc;
    }
}

// ---- softmax attention through cuBLAS (backend/softmax.rs) ----------------------------------------
// One block of R queries (r0 ≤ t < r0 + R) at a time: cuBLAS writes the scores σ q_t·k_s of every
// head into S [H, R, Tk] (row (h, i) at S + (h*R + i)*Tk, Tk = r0 + R keys); these kernels, one
// thread block per row, turn a row into probabilities (causal: s ≤ t) and back.

// P = softmax(S) in place, zero for s > t; log_norm[b, t, h] = log-sum-exp of the row.
extern "C" __global__ void softmax_rows_forward(float* S, float* log_norm, int R, int Tk, int r0, int T, int H, int b) {
    __shared__ float shm[32];
    int h = blockIdx.x / R, i = blockIdx.x % R, t = r0 + i;
    float* row = S + (long)blockIdx.x * Tk;
    float m = __int_as_float(0xff800000);
    for (int s = threadIdx.x; s <= t; s += blockDim.x) m = fmaxf(m, row[s]);
    m = block_max(m, shm);
    float z = 0.f;
    for (int s = threadIdx.x; s <= t; s += blockDim.x) z += __expf(row[s] - m);
    float lse = m + logf(block_sum(z, shm));
    for (int s = threadIdx.x; s < Tk; s += blockDim.x) row[s] = s <= t ? __expf(row[s] - lse) : 0.f;
    if (threadIdx.x == 0) log_norm[((long)b * T + t) * H + h] = lse;
}

// P = exp(S - log_norm) (the forward's probabilities, recomputed from the saved log-sum-exp).
extern "C" __global__ void softmax_rows_recompute(float* S, const float* log_norm, int R, int Tk, int r0, int T, int H, int b) {
    int h = blockIdx.x / R, i = blockIdx.x % R, t = r0 + i;
    float* row = S + (long)blockIdx.x * Tk;
    float lse = log_norm[((long)b * T + t) * H + h];
    for (int s = threadIdx.x; s < Tk; s += blockDim.x) row[s] = s <= t ? __expf(row[s] - lse) : 0.f;
}

// dS = P ∘ (dP − D_t), in place over dP, with D_t = dy_t·y_t.
extern "C" __global__ void softmax_rows_grad(float* dP, const float* P, const float* D, int R, int Tk, int r0, int T, int H, int b) {
    int h = blockIdx.x / R, i = blockIdx.x % R, t = r0 + i;
    long o = (long)blockIdx.x * Tk;
    float d = D[((long)b * T + t) * H + h];
    for (int s = threadIdx.x; s < Tk; s += blockDim.x) dP[o + s] = P[o + s] * (dP[o + s] - d);
}
