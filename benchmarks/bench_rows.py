"""Why a Medusa tree costs more than a plain step on this machine: the default model's weight
matmuls over M rows (tree nodes) against 1 row.

A batch-1 decode step streams every weight once; over 1 row XLA:CPU runs a matrix-vector kernel
at close to memory bandwidth. A verification forward over a T-node tree multiplies T rows by the
same weights: if that also ran at memory speed, small trees would be nearly free (the premise of
Medusa on GPUs). This script measures what the CPU actually does, with the shapes of
SmolLM2-135M-Instruct (random fp32 weights; only the shapes matter):

- ``layers``: the 30 decoder layers' seven projections (q, k, v, o, gate, up, down) as separate
  arrays (the unrolled layout), chained so every weight is read once per call;
- ``lm head``: the tied 49152 x 576 embedding as the output projection (``x @ E.T``).

Every row count runs in every round, in an order that rotates from round to round; the table
gives the median time and the ratio to 1 row. Compile time is excluded (one warm-up call each).

    python benchmarks/bench_rows.py                 # M = 1,2,3,4,6,8,12,16,32,64
"""

from __future__ import annotations

import argparse
import os
import time

import _common as C
import numpy as np

D, F, KV, L, V = 576, 1536, 192, 30, 49152  # SmolLM2-135M: hidden, MLP, kv width, layers, vocab
SHAPES = [(D, D), (D, KV), (D, KV), (D, D), (D, F), (D, F), (F, D)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,2,3,4,6,8,12,16,32,64")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=os.path.join(C.RESULTS, "matmul_rows.md"))
    a = p.parse_args(argv)
    a.rows = sorted({int(r) for r in a.rows.split(",") if r.strip()})
    if not a.rows or a.rows[0] < 1 or a.rounds < 1:
        p.error("--rows must be positive integers and --rounds >= 1")
    if a.rows[0] != 1:
        a.rows = [1, *a.rows]  # the baseline of every ratio
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    import jax
    import jax.numpy as jnp

    info = C.machine_info()
    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.standard_normal(s, np.float32) * 0.03) for _ in range(L) for s in SHAPES]
    emb = jnp.asarray(rng.standard_normal((V, D), np.float32) * 0.03)

    @jax.jit
    def layers(x, ws):
        h = x
        for i in range(0, len(ws), len(SHAPES)):
            q, k, v, o, g, u, d = ws[i: i + len(SHAPES)]
            a_ = h @ q + jnp.concatenate([h @ k, h @ v, jnp.zeros((h.shape[0], D - 2 * KV))], -1)
            h = h + a_ @ o
            h = h + (jax.nn.silu(h @ g) * (h @ u)) @ d * 0.01
        return h

    @jax.jit
    def lm_head(x, e):
        return x @ e.T

    kinds = {"layers": (layers, weights), "lm head": (lm_head, emb)}
    wbytes = {"layers": sum(int(np.prod(s)) for s in SHAPES) * L * 4, "lm head": V * D * 4}
    xs = {m: jnp.asarray(rng.standard_normal((m, D), np.float32)) for m in a.rows}
    for fn, w in kinds.values():  # compile every shape first (not timed)
        for m in a.rows:
            jax.block_until_ready(fn(xs[m], w))
    times = {(k, m): [] for k in kinds for m in a.rows}
    for r in range(a.rounds):
        for m in C.rotated(a.rows, r):
            for k, (fn, w) in kinds.items():
                t = time.perf_counter()
                jax.block_until_ready(fn(xs[m], w))
                times[(k, m)].append(time.perf_counter() - t)
    info["load_average_at_end"] = C.load_average()

    med = {key: float(np.median(v)) * 1e3 for key, v in times.items()}
    rows = []
    for m in a.rows:
        row = [m]
        for k in kinds:
            ms = med[(k, m)]
            row += [ms, ms / med[(k, 1)], wbytes[k] / ms / 1e6]
        rows.append(row)
    header = ["rows M"]
    for k in kinds:
        header += [f"{k} ms", f"{k} / 1 row", f"{k} weight GB/s"]
    small = [r for r in rows if 2 <= r[0] <= 8]
    at = "" if not small else " (M = " + ", ".join(
        f"{r[0]}: layers {r[2]:.2f}x, lm head {r[5]:.2f}x" for r in small) + " the 1-row time)"
    md = f"""# Weight matmuls over M rows vs 1 row (why small trees are not free on this CPU)

Command: `{C.command_line()}`

## Machine
{C.machine_md(info)}
- JAX/XLA on the CPU with its default thread pool; a shared machine: only ratios measured side
  by side in this run are meaningful.

## Setup
- Shapes of SmolLM2-135M-Instruct, float32, random weights: `layers` = 30 x (q {D}x{D}, k and v
  {D}x{KV}, o {D}x{D}, gate and up {D}x{F}, down {F}x{D}) as separate arrays, chained
  ({wbytes['layers'] / 1e6:.0f} MB read per call); `lm head` = `x @ E.T` with the tied
  {V}x{D} embedding ({wbytes['lm head'] / 1e6:.0f} MB).
- {a.rounds} rounds; in each, every row count once (order rotating); median per cell.
  weight GB/s = weight bytes / time (each weight is read once per call).

## Results

{C.md_table(header, rows)}

A 1-row product streams the weights at the machine's memory speed. With 2 or more rows XLA:CPU
switches to its matrix-matrix kernels, which here do not keep that speed for small M: a
verification forward over a handful of tree nodes costs well over one plain step even though
it reads the same bytes{at}.
This is the measured step cost `benchmarks/choose_tree.py` trades against the heads' accuracy.
"""
    path = C.write_results(a.out, md, {"machine": info, "rows": a.rows, "median_ms": {
        f"{k}|{m}": v for (k, m), v in med.items()}, "times_s": {f"{k}|{m}": v for (k, m), v in times.items()}})
    print(md)
    print(f"wrote {a.out} and {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
