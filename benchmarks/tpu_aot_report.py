"""Which TPU slices Medusa-2 training and Medusa decoding of Llama-2-7B / 13B fit on, proven by
compiling them ahead of time with libtpu's compiler on this CPU machine (``medusa_jax.aot``).

Every row is a real compile of our code (the Medusa-2 train step with its optimizer update, or
the Medusa decoding loop) for a real topology, with abstract sharded inputs: nothing is
materialised. Memory numbers are the compiler's, per chip. Training rows search the smallest
slice: the topologies of a group are tried in order until one fits, and every try is a row.

    JAX_PLATFORMS=cpu python benchmarks/tpu_aot_report.py            # everything (~15-25 min)
    python benchmarks/tpu_aot_report.py --only decode                 # one section
    python benchmarks/tpu_aot_report.py --out /tmp/aot.md             # elsewhere

Writes ``benchmarks/results/tpu_aot.md`` and ``tpu_aot.json``. Needs libtpu:
``pip install 'jax[tpu]'`` (the extra matching the installed jax).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # JAX itself stays on the CPU; libtpu compiles

import argparse  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import _common as C  # noqa: E402
import jax  # noqa: E402

from medusa_jax import aot  # noqa: E402
from medusa_jax.sharding import MeshConfig  # noqa: E402
from medusa_jax.training.run_config import load_run_config  # noqa: E402

POD_CONFIG = os.path.join(C.REPO, "configs", "vicuna7b_medusa2_pod.yaml")
GiB = aot.GiB

# (section, label, model preset, [(topology, mesh dict)...] tried in order until one fits, rows
# per data shard tried from the largest down, config overrides). The training recipe is the pod config's: Medusa-2
# with 5 heads x 1 layer, self-distillation (kd: a frozen teacher copy of the base), bf16
# compute with fp32 master weights and Adam moments, full remat of the scanned decoder layers,
# sequence 2048. A data shard is one chip with FSDP only and `tensor` chips with tensor
# parallelism. The first batch that fits on a slice is (to a power of two) its largest.
FSDP = dict(fsdp=-1, tensor=1)
TRAIN_GROUPS = [
    ("7B", "v5e, FSDP only", "llama2-7b",
     [("v5e:2x4", FSDP), ("v5e:4x4", FSDP), ("v5e:4x8", FSDP), ("v5e:8x8", FSDP)], (4, 2, 1), ()),
    ("7B", "v5e, FSDP + tensor parallel", "llama2-7b",
     [("v5e:2x4", dict(fsdp=2, tensor=4)), ("v5e:4x4", dict(fsdp=4, tensor=4)),
      ("v5e:4x8", dict(fsdp=8, tensor=4))], (8, 4, 2, 1), ()),
    # what would make a v5e-8 enough: no teacher copy (plain LM loss instead of
    # self-distillation) is not quite; bf16 weights and Adam moments are
    ("7B", "v5e, FSDP only, `train.kd=false`", "llama2-7b", [("v5e:2x4", FSDP)], (2, 1),
     ("train.kd=false",)),
    ("7B", "v5e, FSDP only, `model.param_dtype=bfloat16`", "llama2-7b", [("v5e:2x4", FSDP)],
     (4, 2, 1), ("model.param_dtype=bfloat16",)),
    ("7B", "v5p, FSDP only", "llama2-7b", [("v5p:2x2x1", FSDP)], (64, 32, 16, 8, 4, 1), ()),
    ("7B", "v5p, FSDP + tensor parallel", "llama2-7b",
     [("v5p:2x2x1", dict(fsdp=2, tensor=2))], (128, 64, 32, 16, 8, 4, 1), ()),
    ("7B", "v5p, 16 hosts from one process: data 4 × FSDP 16", "llama2-7b",
     [("v5p:4x4x4", dict(data=4, fsdp=-1, tensor=1))], (16, 4, 1), ()),
    ("13B", "v5p, FSDP only", "llama2-13b",
     [("v5p:2x2x1", FSDP), ("v5p:2x2x2", FSDP)], (32, 16, 8, 4, 1), ()),
]


# (label, topology, mesh dict, cache_len, weight layout): the 7B model with bf16 weights, bf16
# KV cache and compute, one row, the 64-node mc_sim_7b_63 tree, 5 heads x 1 layer. "default":
# weights passed row-major (as medusa_generate does); "auto": in the compiler's chosen layouts.
DECODE_CASES = [
    ("v5e-1", "v5e:1x1", dict(fsdp=1, tensor=1), 2048, "default"),
    ("v5e-1", "v5e:1x1", dict(fsdp=1, tensor=1), 2048, "auto"),
    ("v5e-1", "v5e:1x1", dict(fsdp=1, tensor=1), 8192, "auto"),
    ("v5e-4, tensor parallel", "v5e:2x2", dict(fsdp=1, tensor=4), 2048, "default"),
    ("v5e-4, tensor parallel", "v5e:2x2", dict(fsdp=1, tensor=4), 8192, "default"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("train", "decode"), help="one section only")
    p.add_argument("--config", default=POD_CONFIG, help="the training config the rows use")
    p.add_argument("--out", default=os.path.join(C.RESULTS, "tpu_aot.md"))
    return p.parse_args(argv)


def _clean():
    jax.clear_caches()
    gc.collect()


def run_train(config: str, log) -> list[dict]:
    """Every compile, in order. Rows marked ``shown`` make the table: per slice, the largest
    batch that fits, or (none fitting) the smallest batch tried."""
    rows = []
    for section, label, preset, topologies, rows_per_shard, overrides in TRAIN_GROUPS:
        for topo_name, mesh in topologies:
            fits = False
            for i, per_shard in enumerate(rows_per_shard):
                topo = aot.get_topology(topo_name)
                shards = topo.num_devices // mesh.get("tensor", 1)
                run = load_run_config(config, [f"train.batch_size={per_shard * shards}",
                                               *overrides])
                cfg, mcfg = aot.model_from_run_config(run, preset)
                rep = aot.compile_train(cfg, mcfg, run.train, topo, MeshConfig(**mesh))
                log(rep.summary())
                last = i == len(rows_per_shard) - 1
                rows.append({"section": section, "label": label, "preset": preset,
                             "rows_per_shard": per_shard, "shown": rep.fits or last,
                             **rep.to_dict()})
                _clean()
                if rep.fits:
                    fits = True
                    break
            if fits:
                break
    return rows


def run_decode(config: str, log) -> list[dict]:
    rows = []
    run = load_run_config(config, ["model.param_dtype=bfloat16", "model.dtype=bfloat16",
                                   "medusa.param_dtype=bfloat16"])
    for label, topo_name, mesh, cache_len, layout in DECODE_CASES:
        cfg, mcfg = aot.model_from_run_config(run, "llama2-7b")
        # positions past Llama-2's 4096 need RoPE scaling; the memory is the same either way
        cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, cache_len))
        rep = aot.compile_decode(cfg, mcfg, topo_name, MeshConfig(**mesh), batch_size=1,
                                 cache_len=cache_len, weight_layout=layout)
        log(rep.summary())
        rows.append({"section": "7B decode", "label": label, "preset": "llama2-7b",
                     **rep.to_dict()})
        _clean()
    return rows


# ------------------------------------------------------------------------------- markdown
def _g(n) -> str:
    return "" if n is None else f"{n / GiB:.2f}"


def _mesh(r) -> str:
    m = r["mesh"]
    return f"{m['data']}×{m['fsdp']}×{m['tensor']}"


def _slice(r) -> str:
    hosts = r["num_hosts"]
    chips = r["num_devices"]
    return f"{r['topology']} ({chips} chip{'s' * (chips > 1)}, {hosts} host{'s' * (hosts > 1)})"


def _fit(r) -> str:
    if r["fits"]:
        return "**fits**"
    need = r["needed_bytes"]
    return f"does not fit (needs {_g(need)} GiB)" if need else "does not fit"


def _total(r) -> str:
    m = r["memory"]
    tot = m["total"] if m else r["needed_bytes"]
    return f"{_g(tot)} / {_g(r['hbm_bytes'])}"


def train_table(rows) -> str:
    header = ["model", "parallelism", "slice", "mesh d×f×t", "global batch (rows per shard)",
              "result",
              "per chip: peak / HBM GiB", "arguments", "temporaries", "params", "Adam state",
              "teacher", "model TFLOP/step", "step @40% MFU", "compile s"]
    out = []
    for r in rows:
        if not r["shown"]:
            continue
        m = r["memory"] or {}
        flops = r["model_flops"]
        step = flops / (0.4 * r["num_devices"] * r["peak_flops"])
        out.append([
            f"{r['section']} Medusa-2", r["label"], _slice(r), _mesh(r),
            f"{r['batch_size']} ({r['rows_per_shard']})", _fit(r), _total(r),
            _g(m.get("argument")), _g(m.get("temp")), _g(r["param_bytes"]),
            _g(r["opt_state_bytes"]), _g(r["extra"]["frozen_base_bytes"]),
            f"{flops / 1e12:.0f}", f"{step:.2f} s", f"{r['compile_s']:.0f}",
        ])
    return C.md_table(header, out)


def decode_table(rows) -> str:
    header = ["model", "slice", "mesh d×f×t", "weight layout", "KV cache tokens", "result",
              "per chip: peak / HBM GiB", "params", "KV cache (all chips)", "temporaries",
              "of which relayout copies", "HBM-bound floor ms/step", "GFLOP/step",
              "compile s"]
    out = []
    for r in rows:
        m = r["memory"] or {}
        out.append([
            "7B Medusa, 64-node tree, bf16, batch 1", _slice(r), _mesh(r),
            r["extra"]["weight_layout"], r["seq_len"], _fit(r), _total(r), _g(r["param_bytes"]),
            f"{_g(r['kv_cache_bytes'])} ({_g(r['kv_cache_total_bytes'])})", _g(m.get("temp")),
            _g(r["extra"].get("entry_relayout_bytes")),
            f"{r['extra']['min_step_s'] * 1e3:.1f}", f"{r['model_flops'] / 1e9:.0f}",
            f"{r['compile_s']:.0f}",
        ])
    return C.md_table(header, out)


def not_fit_notes(rows) -> str:
    lines = []
    for r in rows:
        if not r["fits"] and r.get("shown", True):
            what = (f"{r['section']} Medusa-2 on {r['topology']} ({r['label']}, batch "
                    f"{r['batch_size']})" if r["kind"] == "train"
                    else f"7B decoding on {r['topology']} with {r['seq_len']} cache tokens, "
                    f"{r['extra']['weight_layout']} weight layout")
            lines.append(f"- **{what}**: {r['error']}")
            msg = r["extra"].get("compiler_message")
            if msg:
                lines.append(f"  - compiler: `{msg}`")
    return "\n".join(lines)


def markdown(train, decode, meta, elapsed) -> str:
    parts = [
        "# Medusa on TPU slices, compiled ahead of time",
        "",
        "Produced by `JAX_PLATFORMS=cpu python benchmarks/tpu_aot_report.py` "
        f"({elapsed / 60:.0f} min on this {meta['machine']['nproc']}-core CPU machine, no "
        f"TPU): libtpu {meta['libtpu']} compiles our real train step and decoding loop for each "
        "topology from `jax.experimental.topologies`, with abstract sharded inputs. Memory is "
        "the compiler's `memory_analysis()` per chip: *peak* is its simulated peak of live "
        "bytes, the number it checks against the chip's HBM (a program over it is refused, "
        "with the message quoted below); arguments, outputs and temporaries are its parts "
        "(they add up to more than the peak: temporaries reuse buffers that are free by then, "
        "and the donated state's buffers are reused for the new state). HBM per chip: v5e 16 GiB, v5p 95 GiB "
        "(the compiler keeps a little: 15.75 GiB usable on a v5e).",
        "",
    ]
    if train:
        parts += [
            "## Medusa-2 training, sequence 2048",
            "",
            "Recipe of `configs/vicuna7b_medusa2_pod.yaml`: 5 heads × 1 ResBlock on the shared "
            "LM head, self-distillation (`kd`: a frozen teacher copy of the base is an input), "
            "bf16 compute with fp32 master weights and fp32 Adam moments, full rematerialisation "
            "of the scanned decoder layers, packed rows. Each group tries its slices in order "
            "and stops at the first that fits; on each slice the global batch goes down by "
            "halves from the largest tried until it fits, so a fitting row's batch is the "
            "largest (to a factor of 2) for that slice, and a failing row shows the smallest "
            "batch tried (every compile is in the JSON). A *shard* is one chip with FSDP only, "
            "`tensor` chips with tensor parallelism. *Hosts* are libtpu's default of 4 chips "
            "per host (a v5e-8 can also be one 8-chip host; compiling does not depend on it). "
            "The `train.kd=false` and `model.param_dtype=bfloat16` rows test the two "
            "suggestions for a v5e-8 (bf16 master weights and moments lose updates smaller "
            "than bf16's resolution at Medusa-2's base learning rate, 2e-5, unless the update "
            "is kept in fp32 or stochastically rounded). "
            "*Params*, *Adam state* and *teacher* are this "
            "chip's shares of the state (GiB). Model FLOPs: 6 × (matmul params) per token + "
            "attention, + the teacher's forward; *step @40% MFU* is the step time at 40% of the "
            "chips' bf16 peak (v5e 197, v5p 459 TFLOP/s); MFU for a measured step time t is "
            "`model_flops / (t × chips × peak)` (`AOTReport.mfu`).",
            "",
            train_table(train),
            "",
        ]
    if decode:
        parts += [
            "## Medusa decoding of the 7B model",
            "",
            "The whole decoding loop (`medusa_decode`: verification steps in a `while_loop`, "
            "heads proposing, the 64-node `mc_sim_7b_63` tree verified per step), bf16 weights, "
            "bf16 KV cache of the given length, one row, 256 new tokens. Tensor parallel: heads, "
            "KV heads, MLP columns and vocabulary over 4 chips. *HBM-bound floor*: every weight "
            "and the whole cache read once per step at the chip's HBM bandwidth (v5e 819 GB/s), "
            "a lower bound on a verification step. (8192 positions need RoPE scaling for "
            "Llama-2's 4096; the memory is the same.) *Weight layout*: `default` passes the "
            "weights row-major, as `medusa_generate` does; the compiler then re-tiles the "
            "`[D, N, H]` q/k/v projections (and the KV cache) into its preferred layouts at "
            "every call, in temporaries as large as the originals (*of which relayout copies*, "
            "counted from the compiled HLO). `auto` compiles with `Format(Layout.AUTO)` for the "
            "weights, i.e. a server that places them once in the layouts the compiled program "
            "asks for (`compiled.input_formats`).",
            "",
            decode_table(decode),
            "",
        ]
    notes = not_fit_notes(train + decode)
    if notes:
        parts += ["## What does not fit, and what would make it fit", "", notes, ""]
    parts += [
        "## Reproduce one row",
        "",
        "```",
        "JAX_PLATFORMS=cpu python -m medusa_jax.aot --config configs/vicuna7b_medusa2_pod.yaml \\",
        "    --model llama2-7b --topology v5e:4x4 mesh.fsdp=4 mesh.tensor=4 train.batch_size=16",
        "JAX_PLATFORMS=cpu python -m medusa_jax.aot --config configs/vicuna7b_medusa2_pod.yaml \\",
        "    --model llama2-7b --topology v5e:2x2 --what decode --cache-len 8192 \\",
        "    mesh.fsdp=1 mesh.tensor=4 model.param_dtype=bfloat16 medusa.param_dtype=bfloat16",
        "```",
        "",
        C.machine_md(meta["machine"]),
    ]
    return "\n".join(parts)


def main(argv=None):
    args = parse_args(argv)
    if not aot.libtpu_available():
        raise SystemExit("libtpu is not installed: pip install 'jax[tpu]' (matching jax "
                         f"{jax.__version__})")
    machine = C.machine_info()
    t0 = time.perf_counter()

    def log(s):
        print(f"[{time.perf_counter() - t0:6.0f} s] {s}", flush=True)

    train = run_train(args.config, log) if args.only in (None, "train") else []
    decode = run_decode(args.config, log) if args.only in (None, "decode") else []
    elapsed = time.perf_counter() - t0
    import importlib.metadata

    machine["load_average_at_end"] = C.load_average()
    meta = {
        "machine": machine,
        "libtpu": importlib.metadata.version("libtpu"),
        "jax": jax.__version__,
        "command": C.command_line(),
        "commit": C.git_commit(),
        "elapsed_s": elapsed,
    }
    md = markdown(train, decode, meta, elapsed)
    json_path = C.write_results(args.out, md, {"meta": meta, "train": train, "decode": decode})
    print(f"wrote {args.out} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
