"""What XLA made of a compiled function: its fusions, who reads the inputs, temporaries.

The loss is memory-bound, so the compiled code should read the logits and labels once
and write nothing N-sized except the gradient. ``summarize`` checks that from the
optimized HLO (``compiled.as_text()``) and ``compiled.memory_analysis()``.
"""

from __future__ import annotations

import re
from typing import Any

_LINE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
# The opcode and operand list; the result shape before it may be a tuple with spaces.
_OP = re.compile(r"(?:^|\s)(fusion|custom-call|copy|parameter)\(([^)]*)\)(.*)$")


def _entry_lines(text: str) -> list[str]:
    start = text.index("\nENTRY")
    end = text.find("\n}", start)
    return text[start:end].splitlines()[1:]


def summarize(compiled: Any, n: int) -> dict[str, Any]:
    """Fusions of the entry computation, how many of them read parameters 0 and 1 (the
    logits and the labels), and the temporary bytes (beyond arguments and outputs)."""
    text = compiled.as_text()
    params: dict[int, str] = {}
    ops = []
    for line in _entry_lines(text):
        m = _LINE.match(line)
        op = _OP.search(m.group(2)) if m else None
        if not op:
            continue
        name, (opcode, operands, rest) = m.group(1), op.groups()
        if opcode == "parameter":
            params[int(operands)] = name
            continue
        args = [a.strip().split(" ")[-1].lstrip("%") for a in operands.split(",") if a.strip()]
        kind = re.search(r"kind=(\w+)", rest)
        ynn = "__ynn_fusion" in rest
        ops.append(
            {
                "name": name,
                "opcode": opcode,
                "kind": ("ynn" if ynn else kind.group(1)) if kind else opcode,
                "args": args,
            }
        )
    heavy = ops

    def readers(i: int) -> int:
        return sum(params.get(i) in o["args"] for o in heavy)

    mem = compiled.memory_analysis()
    temp = int(getattr(mem, "temp_size_in_bytes", -1)) if mem is not None else -1
    return {
        "fusions": [o["kind"] for o in heavy],
        "logits_readers": readers(0),
        "labels_readers": readers(1),
        "temp_bytes": temp,
        "temp_per_element": temp / n if temp >= 0 else None,
        "ynn_fusions": sum(o["kind"] == "ynn" for o in heavy),
    }
