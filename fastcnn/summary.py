"""``Module.summary``: a table of a module tree's output shapes, parameters and FLOPs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .module import Module

__all__ = ["summary_table"]


def summary_table(model: Module, input_shape: Sequence[int]) -> str:
    """The table for an input of shape ``input_shape`` (batch dimension included): one row per
    module, in tree order, named by its dotted path and indented by its depth (a root
    ``Sequential`` has no row of its own), then the totals. Shapes are validated on the way."""
    rows = []

    def visit(name, module, shape):
        row = {"name": name, "module": module}
        rows.append(row)
        return row

    out = model.trace_shapes(input_shape, visit)
    table = []
    for row in rows:
        module, name = row["module"], row["name"]
        if name == "" and module.children():
            continue  # the root container: its children are the rows
        own = sum(p.size for n, p in module.named_parameters() if "." not in n)
        depth = name.count(".")
        label = ("  " * depth) + (repr(module) if not module.children() else module.name)
        table.append(
            (name or "-", label, str(row["output_shape"]), f"{own:,}", f"{row['flops']:,}")
        )
    total_params = model.num_parameters()
    total_buffers = sum(b.size for _, b in model.named_buffers())
    total_flops = sum(row["flops"] for row in rows)

    header = ("#", "Layer", "Output shape", "Params", "FLOPs")
    widths = [max(len(r[k]) for r in table + [header]) for k in range(5)]

    def fmt(r):
        return "  ".join(
            [
                r[0].ljust(widths[0]),
                r[1].ljust(widths[1]),
                r[2].ljust(widths[2]),
                r[3].rjust(widths[3]),
                r[4].rjust(widths[4]),
            ]
        ).rstrip()

    width = len(fmt(tuple("x" * w for w in widths)))
    lines = [
        f"{model.name}, input shape {tuple(input_shape)}",
        "=" * width,
        fmt(header),
        "-" * width,
    ]
    lines += [fmt(r) for r in table]
    lines += [
        "=" * width,
        f"Total params: {total_params:,}",
        f"Trainable params: {total_params:,}",
        f"Non-trainable buffers: {total_buffers:,}",
        f"Forward FLOPs: {total_flops:,}",
        f"Output shape: {out}",
    ]
    return "\n".join(lines)
