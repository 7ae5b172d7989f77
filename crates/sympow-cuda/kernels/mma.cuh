// Tensor-core building blocks shared by the fused kernels (sympow_chunked.cu, flash_softmax.cu):
// bf16 packing, mma.sync m16n8k16 (bf16 operands, f32 accumulation)
// and the fragment loads from shared memory. Prepended to each kernel source before NVRTC
// compiles it.

typedef unsigned short bf16;
typedef unsigned int u32;

__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ bf16 f2b(float x) { return (bf16)(pack2(x, 0.f) & 0xffffu); }
__device__ __forceinline__ float b2f(bf16 x) { return __uint_as_float(((u32)x) << 16); }
// Two bf16 products in one instruction, v ⊙ s (bf16 pairs), rounded once: the same bits as
// rounding the exact f32 products (an FMA with −0, as sm_80 has no bf16x2 multiply).
__device__ __forceinline__ u32 mul_bf16x2(u32 v, u32 s) {
    u32 r;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(v), "r"(s), "r"(0x80008000u));
    return r;
}
__device__ __forceinline__ u32 bf16_pair(bf16 lo, bf16 hi) { return (u32)lo | ((u32)hi << 16); }

// c += a·b for a 16×16 (row) by 16×8 (col) tile.
__device__ __forceinline__ void mma16816(float* c, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two accumulator tiles (columns n, n+8 of a 16-row block) as the A fragment of the next product.
__device__ __forceinline__ void acc_to_a(u32* a, const float* c0, const float* c1) {
    a[0] = pack2(c0[0], c0[1]);
    a[1] = pack2(c0[2], c0[3]);
    a[2] = pack2(c1[0], c1[1]);
    a[3] = pack2(c1[2], c1[3]);
}

// ldmatrix .trans: fragments of operands whose tile is stored k-major (token rows), so that
// products contracting over tokens need no transposed copy in shared memory.
__device__ __forceinline__ void ldsm_x4_t(u32* r, const bf16* p) {
    u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldsm_x4(u32* r, const bf16* p) {
    u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
// B fragments of two adjacent tiles n0, n0+8 (b[0..1] and b[2..3]), k0..k0+16, from a tile
// stored n-major, s[n * ld + k]: one ldmatrix instead of four 32-bit loads.
__device__ __forceinline__ void ldb2_nmajor(u32* b, const bf16* s, int ld, int n0, int k0) {
    int lane = threadIdx.x & 31, m = lane >> 3, r = lane & 7;
    ldsm_x4(b, s + (n0 + (m >> 1) * 8 + r) * ld + k0 + (m & 1) * 8);
}
// B fragments of two adjacent tiles n0, n0+8 (b[0..1] and b[2..3]), k0..k0+16, from s[k * ld + n].
__device__ __forceinline__ void ldb2_kmajor(u32* b, const bf16* s, int ld, int k0, int n0) {
    int lane = threadIdx.x & 31, m = lane >> 3, r = lane & 7;
    ldsm_x4_t(b, s + (k0 + (m & 1) * 8 + r) * ld + n0 + (m >> 1) * 8);
}
// A fragment (rows m0..m0+16, columns k0..k0+16) of a matrix stored transposed, s[k * ld + m].
__device__ __forceinline__ void lda_kmajor(u32* a, const bf16* s, int ld, int m0, int k0) {
    int lane = threadIdx.x & 31, mi = lane >> 3, r = lane & 7;
    ldsm_x4_t(a, s + (k0 + (mi >> 1) * 8 + r) * ld + m0 + (mi & 1) * 8);
}

// A fragment (rows r0..r0+16, columns k0..k0+16) of a row-major tile, s[r * ld + k]: one
// ldmatrix instead of four 32-bit loads (ld·2 bytes and k0 multiples of 16 bytes).
__device__ __forceinline__ void lda(u32* a, const bf16* s, int ld, int r0, int k0) {
    int lane = threadIdx.x & 31;
    ldsm_x4(a, s + (r0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8);
}

// acc[0..NT8) += A·B for the 16 rows row0.. of A (row-major, K columns) and B stored n-major,
// b[n * ldb_ + k] (K × 8·NT8, NT8 even): the building block of every tile product here.
template <int K, int NT8>
__device__ __forceinline__ void mma_rows(float (*acc)[4], const bf16* a, int lda_, int row0, const bf16* b, int ldb_) {
    static_assert(NT8 % 2 == 0, "mma_rows takes B two 8-column tiles at a time");
#pragma unroll
    for (int kk = 0; kk < K; kk += 16) {
        u32 af[4];
        lda(af, a, lda_, row0, kk);
#pragma unroll
        for (int nt = 0; nt < NT8; nt += 2) {
            u32 bfr[4];
            ldb2_nmajor(bfr, b, ldb_, nt * 8, kk);
            mma16816(acc[nt], af, bfr);
            mma16816(acc[nt + 1], af, bfr + 2);
        }
    }
}

// Asynchronous copy of rows (as load_rows; rows ≥ nvalid zero-filled): issue now, wait later, so
// the next tile streams in while this one is multiplied (double buffering).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    u32 d = (u32)__cvta_generic_to_shared(dst);
    int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(bytes));
}
// One 4-byte element (zero-filled when !valid; src must still be a valid address).
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
    u32 d = (u32)__cvta_generic_to_shared(dst);
    int bytes = valid ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(d), "l"(src), "r"(bytes));
}
// The rows of a contiguous [rows][cols] source (rows ≥ nvalid zero-filled).
__device__ __forceinline__ void load_rows_async(bf16* dst, int ld, const bf16* src, int nvalid, int rows, int cols) {
    int vec = cols / 8;
    for (int i = threadIdx.x; i < rows * vec; i += blockDim.x) {
        int r = i / vec, c = (i % vec) * 8;
        bool ok = r < nvalid;
        cp_async16(dst + r * ld + c, ok ? src + (long)r * cols + c : src, ok);
    }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
// dst[r][c] = src[r][c] for r < nvalid, 0 beyond, on return (the caller syncs the block before
// other threads read it); cols and ld multiples of 8 (16-byte vectors). By cp.async, so that all
// of a thread's pieces are in flight at once: as a load-store loop, each load waited for the
// previous piece's store (the compiler cannot tell that they don't alias), a memory round trip
// per piece — 8 to 10 of them at the start of every read and intra-chunk block. Waits for every
// cp.async this thread has issued: call it before a block's streaming starts.
__device__ __forceinline__ void load_rows(bf16* dst, int ld, const bf16* src, int nvalid, int rows, int cols) {
    load_rows_async(dst, ld, src, nvalid, rows, cols);
    asm volatile("cp.async.wait_all;" ::: "memory");
}
__device__ __forceinline__ void cp_async_wait_prev() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }
