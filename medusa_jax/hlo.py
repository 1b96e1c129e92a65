"""Reading an optimised HLO module's text: computations, instructions, array types and sizes.

Shared by the compile reports (:mod:`medusa_jax.aot`: relayout copies of arguments;
:mod:`medusa_jax.step_cost`: cache-sized copies and on-chip traffic). Plain text parsing of what
``compiled.as_text()`` prints; nothing here needs jax.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
               "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_COMP_RE = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_ENTRY_RE = re.compile(r"^ENTRY %?([\w.\-]+) ", re.M)
_INSTR_RE = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w-]+)\((.*)$")
_ARRAY_RE = re.compile(r"(pred|bf16|[subf]\d+)\[([\d,]*)\](\{[^}]*\})?")
_NAME_RE = re.compile(r"%([\w.\-]+)")
CALLS_RE = re.compile(r"calls=%([\w.\-]+)")
_LOOP_CALLS_RE = re.compile(r"(?:body|condition|to_apply)=%([\w.\-]+)")


class Instr(NamedTuple):
    name: str
    dtype: str  # of the first array of the type ("" for none)
    dims: tuple
    op: str
    line: str
    type: str  # the whole type string (an array or a tuple)


def arrays(type_str: str) -> list[tuple[str, tuple, bool]]:
    """The arrays of an HLO type (an array or a tuple): ``(dtype, dims, on_chip)``; ``on_chip``
    is a layout in memory space 1 (``S(1)``: on a TPU, VMEM, where the compiler prefetches)."""
    return [(m.group(1), tuple(int(d) for d in m.group(2).split(",") if d),
             "S(1)" in (m.group(3) or "")) for m in _ARRAY_RE.finditer(type_str)]


def nbytes(dtype: str, dims: tuple) -> int:
    return math.prod(dims) * DTYPE_BYTES.get(dtype, 4)


def computations(hlo_text: str) -> dict[str, list[Instr]]:
    """computation name -> its instructions, in order."""
    comps: dict[str, list[Instr]] = {}
    cur = None
    for line in hlo_text.splitlines():
        if cur is None:
            m = _COMP_RE.match(line)
            if m and "=" not in line.split("{")[0].split("(")[0]:
                cur = m.group(1)
                comps[cur] = []
            continue
        if line.strip() == "}":
            cur = None
            continue
        m = _INSTR_RE.match(line)
        if m:
            arrs = arrays(m.group(2))
            dt, dims = (arrs[0][0], arrs[0][1]) if arrs else ("", ())
            comps[cur].append(Instr(m.group(1), dt, dims, m.group(3), line, m.group(2)))
    return comps


def entry_name(hlo_text: str) -> str:
    """The name of the module's entry computation."""
    return _ENTRY_RE.search(hlo_text).group(1)


def fused_computations(hlo_text: str) -> set[str]:
    """Computations called by fusions (``calls=``), less any also used as a loop body,
    condition or reducer: their instructions run inside one kernel and move no bytes of their
    own."""
    return set(CALLS_RE.findall(hlo_text)) - set(_LOOP_CALLS_RE.findall(hlo_text))


def operands(ins: Instr) -> list[str]:
    """Names of an instruction's operands."""
    return _NAME_RE.findall(ins.line.split(f" {ins.op}(", 1)[1].split(")", 1)[0])
