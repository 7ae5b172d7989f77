// Microbenchmark of the fused reads' inner loop (crates/sympow-cuda/kernels/sympow_chunked.cu,
// wg_read_pass): which of its parts takes a wgmma m64n80k16 loop (A from registers, B no-swizzle
// N-major in shared memory) from ~940 TFLOP/s down to what the read kernels reach, and what
// brings it back. On the GPU machine (nvcc there; this machine has no CUDA compiler):
//   nvcc -O3 -gencode arch=compute_90a,code=sm_90a bench/wgmma_stream.cu -o /tmp/ws && /tmp/ws
// Each variant: 1 block (256 threads, two warpgroups) an SM × 4 waves, 1,024 slices a block;
// a slice = 64 rows × 80 bf16 (10 KB); per slice and warpgroup 4 k-steps × RW m64 tiles.
// Variant bits: 1 scale A every step (one fma.rn.bf16x2 a register, as the kernel), 2 a block
// barrier every step, 4 stream every slice from global memory by cp.async (a 6-stage ring,
// issued 4 ahead, each thread 2–3 16-byte pieces a slice, as load_core_rows), 8 each block reads
// its own 640 KB (else all share one), 16 RW = 2 (two m64 tiles against each B, as the kernel at
// d = 64), 32 2.5 k-steps on average (the packed r read: slice a has k-steps from tile(a)),
// 64 warp-specialised streaming: a 9th warp issues the cp.async loads, waits for them, fences
// and arrives on the stage's "full" mbarrier; the warpgroups wait on it and arrive on "empty"
// when their products of the stage are done — no block barrier.
// 128 bulk streaming (Hopper's TMA engine, 1-D): the producer warp's one thread waits on "empty",
// arms "full" with the slice's bytes (mbarrier expect_tx) and issues one cp.async.bulk of the
// whole 10 KB slice (so the slice must lie in global memory in the core-matrix order already).
// 256 four consecutive blocks read the same 640 KB (as the kernel's 4 blocks a chunk state).
// 512 multicast: those 4 blocks are a cluster; each block's producer copies a quarter of the
// slice into all 4 blocks' shared memory (.multicast::cluster), and a stage is refilled only
// when all 4 blocks have released it (their warps arrive on every block's "empty").
//
// Measured on the lent H100 (80GB HBM3, driver 580.159.04), 2026-11-23 — docs/PERFORMANCE.md:
//   registers A, B fixed in smem                               0.75 ms  941 TFLOP/s
//   + A scaled, + block barrier every step                     0.75 ms  947
//   + B streamed by cp.async (all blocks one 640 KB: L2)       2.59 ms  273
//   RW = 2, scaled, barrier, no streaming                      1.49 ms  951
//   cp.async, block barrier, RW 2, 4 blocks a 640 KB (kernel)  2.31 ms  615
//   warp-specialised cp.async streaming, own 640 KB, RW 2      3.76 ms  377
//   bulk copy, RW 2, 4 blocks a 640 KB                         1.59 ms  892
//   bulk multicast to a cluster of 4, RW 2                    10.81 ms  131
// So the streaming, not the products, bounded the reads: 16-byte cp.async pieces from L2 move
// ≈ 2 TB/s here, one bulk copy a slice almost hides behind the products (the kernels now copy
// that way); multicast as written here (every warp arriving on 4 blocks' barriers) is far
// slower, and a producer warp issuing cp.async is slower than all threads issuing it.
#include <cstdio>
#include <cstdint>
#include <cuda_runtime.h>
typedef unsigned short bf16;
typedef unsigned int u32;

__device__ __forceinline__ uint64_t desc(const void* p, u32 lbo, u32 sbo) {
    u32 a = (u32)__cvta_generic_to_shared(p);
    return (uint64_t)((a & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32);
}
__device__ __forceinline__ void wg80(float* d, const u32* a, uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n80k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,"
        "%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39},"
        "{%40,%41,%42,%43}, %44, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
__device__ __forceinline__ u32 mul_bf16x2(u32 a, u32 b) {
    u32 r;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(0x80008000u));
    return r;
}
__device__ __forceinline__ void cp16(void* dst, const void* src) {
    u32 d = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src));
}

constexpr int E = 80, ROWS = 64, SLICE = ROWS * E, ST = 6, LOOK = 4, SLICES = 64;

__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(uint64_t* b, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(b)), "r"(count));
}
__device__ __forceinline__ void mbar_arrive(uint64_t* b) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}" ::"r"(smem_u32(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* b, u32 parity) {
    asm volatile(
        "{\n.reg .pred p;\nWAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAIT_%=;\n}" ::"r"(smem_u32(b)),
        "r"(parity)
        : "memory");
}

__device__ __forceinline__ void mbar_expect_tx(uint64_t* b, u32 bytes) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}" ::"r"(smem_u32(b)),
                 "r"(bytes)
                 : "memory");
}
// arrive on the barrier at b's offset in the shared memory of cluster block `rank`
__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* b, u32 rank) {
    asm volatile(
        "{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, %0, %1;\n"
        "mbarrier.arrive.release.cluster.shared::cluster.b64 _, [ra];\n}" ::"r"(smem_u32(b)),
        "r"(rank)
        : "memory");
}
__device__ __forceinline__ void mbar_wait_cluster(uint64_t* b, u32 parity) {
    asm volatile(
        "{\n.reg .pred p;\nWAITC_%=:\n"
        "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAITC_%=;\n}" ::"r"(smem_u32(b)),
        "r"(parity)
        : "memory");
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, u32 bytes, uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
            smem_u32(dst)),
        "l"(src), "r"(bytes), "r"(smem_u32(bar))
        : "memory");
}
__device__ __forceinline__ void bulk_copy_multicast(void* dst, const void* src, u32 bytes, uint64_t* bar,
                                                    unsigned short mask) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1], %2, [%3], "
        "%4;" ::"r"(smem_u32(dst)),
        "l"(src), "r"(bytes), "r"(smem_u32(bar)), "h"(mask)
        : "memory");
}
__device__ __forceinline__ u32 cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

template <int VAR>
__global__ void __launch_bounds__(288) mb(float* out, const bf16* src, int steps) {
    extern __shared__ __align__(128) bf16 sm[];
    constexpr bool SCALE = VAR & 1, BAR = VAR & 2, OWN = VAR & 8, BULK = VAR & 128, SHARE4 = VAR & 256,
                   MC = VAR & 512, WS = (VAR & 64) || BULK, STREAM = (VAR & 4) || WS;
    constexpr int CL = MC ? 4 : 1;  // blocks whose warps release each stage
    constexpr int RW = VAR & 16 ? 2 : 1;
    uint64_t* full = (uint64_t*)(sm + ST * SLICE);
    uint64_t* empty = full + ST;
    for (int i = threadIdx.x; i < ST * SLICE; i += blockDim.x) sm[i] = (bf16)(0x3c00 + (i & 7));
    if (WS && threadIdx.x == 0)
        for (int s = 0; s < ST; s++) mbar_init(full + s, BULK ? 1 : 32), mbar_init(empty + s, 8 * CL);
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    __syncthreads();
    if (MC) cluster_sync();  // every block's barriers exist before any block signals them
    const bf16* base =
        src + (SHARE4 ? (long)(blockIdx.x / 4) * SLICES * SLICE : OWN ? (long)blockIdx.x * SLICES * SLICE : 0);
    // the 16-byte pieces of slice i into its stage, by `n` threads from `t0`
    auto load = [&](int i, int t, int n) {
        bf16* st = sm + (i % ST) * SLICE;
        const bf16* s = base + (long)(i % SLICES) * SLICE;
        for (int p = t; p < SLICE / 8; p += n) {
            int r8 = p & 7, cg = (p >> 3) % (E / 8), rg = p / E, row = rg * 8 + r8;
            cp16(st + (rg * (E / 8) + cg) * 64 + r8 * 8, s + row * E + cg * 8);
        }
        asm volatile("cp.async.commit_group;");
    };
    auto issue = [&](int i) {
        if (STREAM && !WS) load(i, threadIdx.x, 256);
    };
    if (BULK && threadIdx.x >= 256) {  // the producer warp: one thread, one bulk copy a slice
        if (threadIdx.x == 256) {
            constexpr u32 BYTES = SLICE * 2, PART = BYTES / CL;
            u32 rank = MC ? cluster_rank() : 0;
            for (int j = 0; j < steps; j++) {
                if (j >= ST) {
                    if (MC) mbar_wait_cluster(empty + j % ST, ((j / ST) - 1) & 1);
                    else mbar_wait(empty + j % ST, ((j / ST) - 1) & 1);
                }
                bf16* st = sm + (j % ST) * SLICE;
                const bf16* s = base + (long)(j % SLICES) * SLICE;
                mbar_expect_tx(full + j % ST, BYTES);
                if (MC)
                    bulk_copy_multicast((char*)st + rank * PART, (const char*)s + rank * PART, PART, full + j % ST,
                                        0xF);
                else
                    bulk_copy(st, s, BYTES, full + j % ST);
            }
        }
        if (MC) cluster_sync();
        return;
    }
    if (WS && threadIdx.x >= 256) {  // the producer warp
        int lane = threadIdx.x & 31;
        constexpr int INFL = 2;  // slices in flight
        for (int j = 0; j < steps; j++) {
            if (j >= ST) mbar_wait(empty + j % ST, ((j / ST) - 1) & 1);
            load(j, lane, 32);
            if (j >= INFL - 1) {
                asm volatile("cp.async.wait_group %0;" ::"n"(INFL - 1) : "memory");
                asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
                mbar_arrive(full + (j - INFL + 1) % ST);
            }
        }
        asm volatile("cp.async.wait_group 0;" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        for (int j = steps - INFL + 1; j < steps; j++) mbar_arrive(full + j % ST);
        return;
    }
    float d[RW][40];
    for (int m = 0; m < RW; m++)
        for (int i = 0; i < 40; i++) d[m][i] = 0.f;
    u32 a[RW][4][4], s[2][RW][4][4];
    for (int m = 0; m < RW; m++)
        for (int k = 0; k < 4; k++)
            for (int j = 0; j < 4; j++) a[m][k][j] = 0x3c003c00u + threadIdx.x + j + m;
    if (!WS)
        for (int i = 0; i < LOOK; i++) issue(i);
    for (int it = 0; it < steps; it += 2) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int i = it + h;
            int first = VAR & 32 ? (i % SLICES) >> 4 : 0;  // packed: k-steps from tile(a)
            if (WS) {
                mbar_wait(full + i % ST, (i / ST) & 1);
            } else {
                if (STREAM) {
                    asm volatile("cp.async.wait_group %0;" ::"n"(LOOK - 1) : "memory");
                    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
                }
                if (BAR || STREAM) __syncthreads();
                issue(i + LOOK);
            }
            u32 f = 0x3f803f80u + (u32)(i & 7);
#pragma unroll
            for (int m = 0; m < RW; m++)
#pragma unroll
                for (int k = 0; k < 4; k++)
#pragma unroll
                    for (int j = 0; j < 4; j++) s[h][m][k][j] = SCALE ? mul_bf16x2(a[m][k][j], f) : a[m][k][j];
            asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
            const bf16* Ss = sm + (STREAM ? (i % ST) * SLICE : 0);
#pragma unroll
            for (int k = 0; k < 4; k++) {
                if (k < first) continue;
                uint64_t db = desc(Ss + (k - first) * 16 * E, E * 16, 128);
#pragma unroll
                for (int m = 0; m < RW; m++) wg80(d[m], s[h][m][k], db);
            }
            asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
            asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
            // slice i − 1's products are done: its stage may be refilled
            if (WS && i >= 1 && (threadIdx.x & 31) == 0) {
                if (MC)
                    for (u32 c = 0; c < CL; c++) mbar_arrive_cluster(empty + (i - 1) % ST, c);
                else
                    mbar_arrive(empty + (i - 1) % ST);
            }
        }
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    float t = 0;
    for (int m = 0; m < RW; m++)
        for (int i = 0; i < 40; i++) t += d[m][i];
    if (t == 12345.f) out[0] = t;
    if (MC) cluster_sync();  // no block leaves while another may still arrive on its barriers
}

template <int VAR>
void run(const char* name, const bf16* src, int waves) {
    float* o;
    cudaMalloc(&o, 4);
    int steps = SLICES * 16, blocks = 132 * waves, smem = ST * SLICE * 2 + 2 * ST * 8;
    int threads = VAR & (64 | 128) ? 288 : 256;
    cudaFuncSetAttribute(mb<VAR>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = VAR & 512 ? 4 : 1;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    cudaLaunchKernelEx(&cfg, mb<VAR>, o, src, 16);
    cudaDeviceSynchronize();
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    cudaEventRecord(e0);
    cudaLaunchKernelEx(&cfg, mb<VAR>, o, src, steps);
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms;
    cudaEventElapsedTime(&ms, e0, e1);
    double ks = VAR & 32 ? 2.5 : 4.0, rw = VAR & 16 ? 2 : 1;
    double flop = 2.0 * blocks * 2 /*warpgroups*/ * steps * ks * rw * 64.0 * E * 16;
    printf("%-62s %8.3f ms %6.0f TFLOP/s  (%s)\n", name, ms, flop / ms / 1e9, cudaGetErrorString(cudaGetLastError()));
}

int main() {
    setvbuf(stdout, NULL, _IONBF, 0);
    int waves = 4;
    bf16* src;  // every block's own 640 KB (OWN), 132·waves of them: ≈ 340 MB, past L2 as the kernel's states
    size_t n = (size_t)132 * waves * SLICES * SLICE;
    cudaMalloc(&src, n * 2);
    cudaMemset(src, 0x3c, n * 2);
    run<0>("registers A, B fixed in smem", src, waves);
    run<1>("+ A scaled every step", src, waves);
    run<3>("+ block barrier every step", src, waves);
    run<7>("+ B streamed by cp.async (all blocks one 640 KB: L2)", src, waves);
    run<15>("+ each block its own 640 KB (DRAM/L2, as the kernel)", src, waves);
    run<31>("+ RW = 2 (two m64 tiles a warpgroup, as d = 64)", src, waves);
    run<63>("+ packed k-steps (2.5 of 4 on average: the r read)", src, waves);
    run<19>("RW = 2, scaled, barrier, no streaming", src, waves);
    run<51>("RW = 2, scaled, barrier, packed, no streaming", src, waves);
    run<77>("warp-specialised streaming, own 640 KB, scaled (RW 1)", src, waves);
    run<93>("warp-specialised streaming, own 640 KB, scaled, RW = 2", src, waves);
    run<125>("warp-specialised streaming, own, scaled, RW = 2, packed", src, waves);
    run<1 + 16 + 256 + 4>("cp.async, block barrier, RW 2, 4 blocks a 640 KB (the kernel)", src, waves);
    run<1 + 16 + 256 + 4 + 32>("  the same, packed k-steps (the r read)", src, waves);
    run<1 + 16 + 128>("bulk copy, RW 2, all blocks one 640 KB (L2)", src, waves);
    run<1 + 16 + 128 + 256>("bulk copy, RW 2, 4 blocks a 640 KB", src, waves);
    run<1 + 16 + 128 + 256 + 32>("  the same, packed k-steps", src, waves);
    run<1 + 16 + 128 + 256 + 512>("bulk multicast to a cluster of 4, RW 2, 4 blocks a 640 KB", src, waves);
    run<1 + 16 + 128 + 256 + 512 + 32>("  the same, packed k-steps", src, waves);
    return 0;
}
