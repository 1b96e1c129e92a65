"""medusa_jax.profiling: ops named by the executable's HLO and attributed to the decode step's
phases (the named scopes of the Medusa and vanilla steps), from a real trace on this CPU."""

import jax
import pytest

from medusa_jax import profiling
from medusa_jax.decoding.common import GenerationSettings
from medusa_jax.decoding.vanilla import generate, vanilla_decode

HLO = """HloModule jit_f

%fused_computation.3 (param_0.3: f32[2,4], param_1.3: f32[4,2]) -> f32[2,2] {
  %param_0.3 = f32[2,4]{1,0} parameter(0)
  %param_1.3 = f32[4,2]{1,0} parameter(1)
  ROOT %dot.9 = f32[2,2]{1,0} dot(%param_0.3, %param_1.3), metadata={op_name="jit(f)/while/body/verify/LlamaModel/layers_0/mlp/dot_general"}
}

%bare_computation (p: f32[2,2]) -> f32[2,2] {
  %p = f32[2,2]{1,0} parameter(0)
  ROOT %neg = f32[2,2]{1,0} negate(%p)
}

%dot_computation (p0: f32[2,4], p1: f32[4,2]) -> f32[2,2] {
  %p0 = f32[2,4]{1,0} parameter(0)
  %p1 = f32[4,2]{1,0} parameter(1)
  ROOT %d = f32[2,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.1 (a: f32[2,4], b: f32[4,2]) -> f32[2,2] {
  %a = f32[2,4]{1,0} parameter(0)
  %b = f32[4,2]{1,0} parameter(1)
  %norm.1 = f32[2,4]{1,0} multiply(%a, %a), metadata={op_name="jit(f)/while/body/verify/LlamaModel/layers_0/attn_norm/mul"}
  %ynn_fusion.8 = f32[2,2]{1,0} fusion(%norm.1, %b), kind=kCustom, calls=%dot_computation
  %ynn_fusion.3 = f32[2,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.3
  %loop_fusion.7 = f32[2,2]{1,0} fusion(%ynn_fusion.3), kind=kLoop, calls=%bare_computation
  ROOT %add.1 = f32[2,2]{1,0} add(%loop_fusion.7, %loop_fusion.7), metadata={op_name="jit(f)/while/body/commit/add"}
}
"""


def test_op_names_reach_fusions_without_metadata():
    names = profiling.op_names(HLO)
    mlp = "jit(f)/while/body/verify/LlamaModel/layers_0/mlp/dot_general"
    assert names["dot.9"] == mlp
    assert names["ynn_fusion.3"] == mlp  # from the computation it calls
    assert names["loop_fusion.7"] == mlp  # from its operand
    assert names["loop_fusion_7"] == mlp  # a GPU kernel's spelling
    assert names["add.1"] == "jit(f)/while/body/commit/add"
    # a matmul named nowhere, after the attention norm: the attention's projection
    assert names["ynn_fusion.8"] == "jit(f)/while/body/verify/LlamaModel/layers_0/attn/dot_general"


def test_classify_phases_and_parts():
    c = profiling.classify
    assert c("jit(medusa_decode)/while/body/verify/LlamaModel/layers_3/attn/prefix/exp") == (
        "verify", "attention over the cache (prefix)")
    assert c("jit(medusa_decode)/while/body/verify/LlamaModel/layers_3/attn/new_tokens/dot_general"
             ) == ("verify", "attention among the new tokens (tree block)")
    assert c("jit(medusa_decode)/while/body/propose/MedusaHeads/dot_general")[0] == "propose"
    assert c("jit(medusa_decode)/while/body/accept/reduce") == ("accept", "other")
    assert c("jit(medusa_decode)/while/lt") == ("loop", "other")
    assert c(None)[0] == "unattributed"


def test_busy_time_is_the_union_of_intervals():
    ev = [profiling.Event("a", None, 0, 10, "s"), profiling.Event("b", None, 5, 10, "s"),
          profiling.Event("c", None, 30, 5, "s"), profiling.Event("d", None, 31, 1, "s")]
    assert profiling._busy_ns(ev) == 20
    s = profiling.summarize(ev, {"a": "jit(f)/while/body/verify/x", "b": "jit(f)/while/body/x"},
                            steps=2, wall_s=1e-3)
    assert s["ops_per_step"] == 2 and s["wall_ms_per_step"] == 0.5
    assert {u["name"] for u in s["unmapped"]} == {"c", "d"}
    phases = profiling.phase_totals(s)
    assert phases["verify"] == 10 / 2e6 and phases["unattributed"] == 6 / 2e6


def test_trace_of_a_vanilla_loop_is_attributed_to_its_phases(tiny_cfg, tiny_params):
    gen = GenerationSettings(max_new_tokens=12, eos_token_ids=())

    def run():
        return generate(tiny_cfg, tiny_params, [[5, 6, 7]], gen)

    run()  # compiled before the trace, as profile() asks
    s = profiling.profile(run, vanilla_decode, lambda r: r["steps"] - 1)
    assert s["steps"] == 11 and s["source"] == "host" and s["ops_per_step"] > 10
    phases = profiling.phase_totals(s)
    assert phases["verify"] > 0.5 * s["op_ms_per_step"]
    assert phases["accept"] > 0 and phases["commit"] > 0
    assert phases.get("unattributed", 0.0) < 0.1 * s["op_ms_per_step"], phases
    assert jax.default_backend() == "cpu"


class _Ev:
    def __init__(self, name, start, dur, **stats):
        self.name, self.start_ns, self.duration_ns = name, start, dur
        self.stats = list(stats.items())


class _Line:
    def __init__(self, name, events):
        self.name, self.events = name, events


class _Plane:
    def __init__(self, name, lines):
        self.name, self.lines = name, lines


def test_device_planes_win_over_host_events(monkeypatch):
    """A GPU trace: kernels on the stream lines (named by their hlo_op statistic where there is
    one, else by the kernel's own name), host-side op events ignored, an "XLA Ops" line
    preferred where a plane has one (it summarises the streams: counting both doubles)."""
    planes = [
        _Plane("/host:CPU", [_Line("python", [_Ev("wrapped_x", 0, 5, hlo_op="x.1")])]),
        _Plane("/device:GPU:0", [
            _Line("Stream #13(Compute)", [_Ev("loop_fusion_3", 10, 4, hlo_module="jit_f"),
                                          _Ev("sm90_gemm", 20, 6, hlo_op="dot.2",
                                              hlo_module="jit_f"),
                                          _Ev("MemcpyD2H", 30, 1)]),
            _Line("Launch Stats", [_Ev("ignored", 0, 100)])]),
        _Plane("/device:TPU:0", [
            _Line("XLA Ops", [_Ev("fusion.4", 40, 2, hlo_module="jit_f")]),
            _Line("XLA Modules", [_Ev("jit_f", 40, 50)])]),
    ]

    class FakeData:
        @staticmethod
        def from_file(path):
            return type("D", (), {"planes": planes})()

    import jax.profiler

    monkeypatch.setattr(jax.profiler, "ProfileData", FakeData)
    events, source = profiling.read_events("trace.xplane.pb")
    assert source == "device"
    assert [(e.name, e.dur_ns) for e in events] == [
        ("loop_fusion_3", 4), ("dot.2", 6), ("MemcpyD2H", 1), ("fusion.4", 2)]
    names = {"loop_fusion_3": "jit(f)/while/body/verify/LlamaModel/layers_0/mlp/mul",
             "dot.2": "jit(f)/while/body/verify/LlamaModel/layers_0/attn/dot_general",
             "fusion.4": "jit(f)/while/body/commit/add"}
    s = profiling.summarize(events, names, steps=1, wall_s=1e-4, module="jit_f")
    assert s["copies"]["per_step"] == 1 and s["ops_per_step"] == 3
    assert profiling.phase_totals(s) == pytest.approx({"verify": 10e-6, "commit": 2e-6})
