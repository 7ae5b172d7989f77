"""How precisely must the discounted cumulative sum over chunks carry its running state?

The fused kernels sum the chunk states S_{i+1} = e^{Γ_i} S_i + ΔS_i in f32 and store each S_i
in bf16 (sp_discumsum). A form that passes the sum from chunk to chunk through memory
(docs/PERFORMANCE.md, tenth session: the cumsum folded into the chunk states) would carry it
as bf16 — alone, with its rounding error as a second bf16 ("hilo") or as one byte in units of
ulp/256 ("hi8"). This float64 simulation (p = 2, d = 16, chunks of 64, q and k sharing a
random direction as in `sympow device-check`) prints each carry's error in the last chunk's
state and in that chunk's inter-chunk output, with and without gates.
    python3 bench/chain_precision.py        (needs numpy)
"""
import numpy as np


def bf16(x):
    """Round to the nearest bf16 (ties to even), kept as float32."""
    b = np.asarray(x, dtype=np.float32).view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)


def chain(deltas, gam, carry):
    """The states entering each chunk, S_0 = 0, with the running sum carried as `carry` says."""
    states = [np.zeros_like(deltas[0])]
    run = np.zeros_like(deltas[0])
    hi = np.zeros_like(deltas[0], dtype=np.float32)
    lo = np.zeros_like(hi)
    for c in range(len(deltas) - 1):
        decay = np.exp(gam[c])
        if carry == "f64":
            run = decay * run + deltas[c]
            states.append(run.copy())
            continue
        if carry == "f32":
            run = np.float32(decay) * run.astype(np.float32) + deltas[c].astype(np.float32)
            states.append(bf16(run))
            continue
        r = np.float32(decay) * (hi + lo) + deltas[c].astype(np.float32)
        hi = bf16(r)
        if carry == "hilo":
            lo = bf16(r - hi)
        elif carry == "hi8":
            e = ((hi.view(np.uint32) >> 23) & 0xFF).astype(np.int64)
            unit = np.where(e > 15, np.ldexp(1.0, e - 127 - 15), 0.0)
            q = np.where(unit > 0, (r - hi) / np.where(unit > 0, unit, 1.0), 0.0)
            lo = (np.clip(np.rint(q), -127, 127) * unit).astype(np.float32)
        states.append(hi)
    return states


def main():
    rng = np.random.default_rng(0)
    d, L = 16, 64
    for nc in [8, 32, 128]:
        for gated in [False, True]:
            T = nc * L
            m = rng.standard_normal(d)
            q = rng.standard_normal((T, d)) + m
            k = rng.standard_normal((T, d)) + m
            v = rng.standard_normal((T, d))
            g = np.log(rng.uniform(0.99, 0.999, T)) if gated else np.zeros(T)
            vp = np.concatenate([v, np.ones((T, 1))], 1)
            G = np.concatenate([np.cumsum(g[c * L:(c + 1) * L]) for c in range(nc)])
            gam = np.array([G[(c + 1) * L - 1] for c in range(nc)])
            deltas = []
            for c in range(nc):
                s = slice(c * L, (c + 1) * L)
                kt = k[s] * np.exp(0.5 * (gam[c] - G[s]))[:, None]
                phi = bf16(np.einsum("ta,tb->tab", kt, kt).reshape(L, d * d)).astype(np.float64)
                deltas.append(phi.T @ vp[s])
            exact = chain(deltas, gam, "f64")
            s = slice((nc - 1) * L, nc * L)
            qt = q[s] / np.sqrt(d) * np.exp(0.5 * G[s])[:, None]
            phi = bf16(np.einsum("ta,tb->tab", qt, qt).reshape(L, d * d)).astype(np.float64)
            ref = phi @ exact[-1]
            y_ref = ref[:, :d] / ref[:, d:]
            for carry in ["f32", "bf16", "hilo", "hi8"]:
                st = chain(deltas, gam, carry)
                out = phi @ st[-1].astype(np.float64)
                y = out[:, :d] / out[:, d:]
                es = np.linalg.norm(st[-1] - exact[-1]) / np.linalg.norm(exact[-1])
                ey = np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref)
                print(f"{nc:4d} chunks, gated {gated!s:5}, carry {carry:4}: "
                      f"state rel err {es:.2e}, inter-chunk y rel err {ey:.2e}")


if __name__ == "__main__":
    main()
