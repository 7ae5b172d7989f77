// Generation: one token of sympow attention per (sequence, head) in the recurrent form
// (SPEC §9), the state [S | z] (D × (e+1), f64) resident on the GPU:
//   S ← γ·S + φ(k)·[v, 1]ᵀ,   y = φ(σq)ᵀ S[:, :e] / (φ(σq)ᵀ S[:, e] + ε).
// The state is read and written once per token (memory-bound: D·(e+1)·16 bytes per head),
// so a step costs the same at any context length. Compiled at run time by NVRTC.

#define DECODE_ROWS 32

// grid (ceil(D / DECODE_ROWS), batch·heads): each block updates DECODE_ROWS rows of one head's
// state and writes their contribution φ(σq)ᵀS to partial[head][tile][0..e] (read by
// sympow_decode_read: deterministic, no atomics). idx/coef: the φ_p table (D × p, D).
extern "C" __global__ void sympow_decode_update(double* S, double* partial, const float* q, const float* k,
                                                const float* v, const float* log_g, const int* idx,
                                                const double* coef, int D, int p, int d, int e, double scale) {
    __shared__ double phk[DECODE_ROWS], phq[DECODE_ROWS];
    int tile = blockIdx.x, bh = blockIdx.y, tiles = gridDim.x, e1 = e + 1;
    int i0 = tile * DECODE_ROWS, rows = min(DECODE_ROWS, D - i0);
    if (threadIdx.x < rows) {
        int i = i0 + threadIdx.x;
        double fk = coef[i], fq = coef[i];
        for (int j = 0; j < p; j++) {
            int a = idx[i * p + j];
            fk *= (double)k[(long)bh * d + a];
            fq *= scale * (double)q[(long)bh * d + a];
        }
        phk[threadIdx.x] = fk;
        phq[threadIdx.x] = fq;
    }
    __syncthreads();
    double decay = log_g ? exp((double)log_g[bh]) : 1.0;
    double* s = S + ((long)bh * D + i0) * e1;
    for (int c = threadIdx.x; c < e1; c += blockDim.x) {
        double vc = c < e ? (double)v[(long)bh * e + c] : 1.0, acc = 0.0;
        for (int r = 0; r < rows; r++) {
            double x = s[(long)r * e1 + c] * decay + phk[r] * vc;
            s[(long)r * e1 + c] = x;
            acc += phq[r] * x;
        }
        partial[((long)bh * tiles + tile) * e1 + c] = acc;
    }
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
