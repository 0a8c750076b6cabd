"""`cskd export`: a trained IAA model as an ONNX or TorchScript file, with a parity check against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ._common import console, err_console, failing, show
from ._options import DefaultsOpt, TrustCodeOpt


def export(
    model: Annotated[Path, typer.Option(help="RUN_DIR of a finished `cskd finetune` / `cskd distill` run "
                                             "(iaa_model.json + iaa_model.safetensors).")],
    format_: Annotated[str, typer.Option("--format", help="onnx (needs onnxruntime for the check) or torchscript.")],
    out: Annotated[Path, typer.Option(help="File to write; FILE.json next to it gets the I/O names, shapes and "
                                           "the input_cfg for preprocessing.")],
    batch_size_dynamic: Annotated[bool, typer.Option(help="Any batch size (dynamic axis 0); static: only "
                                                          "--batch-size.")] = True,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch the graph is traced at; the only batch it takes "
                                                        "with --no-batch-size-dynamic.")] = 1,
    opset: Annotated[int, typer.Option(help="ONNX opset version (ignored for torchscript).")] = 17,
    atol: Annotated[float, typer.Option(min=0, help="Largest allowed |exported - PyTorch| over all outputs in the "
                                                    "parity check; above it the file is removed and the exit is 1.")]
    = 1e-4,
    seed: Annotated[int, typer.Option(help="Seed of the parity-check inputs.")] = 0,
    trust_code: TrustCodeOpt = False,
    config: DefaultsOpt = None,
) -> None:
    """Export a trained IAA model for deployment and check it against PyTorch.

    \b
    Input  "image": float32 (B, 3, H, W), the eval view at the model's input size, /255 then (x - mean) / std
           (size, mean, std, interpolation and crop in FILE.json "input_cfg").
    Output "score": float32 (B,), the score on the training dataset's native scale;
           "dist":  float32 (B, K), the K-bin distribution (distribution heads only).
    TorchScript forward(image) returns the tuple (score,) or (score, dist).
    Parity: random and photo-like inputs, at two batch sizes when dynamic; max |diff| printed, > --atol = exit 1.
    """
    from cskd_cache.evaluate.export import EXPORT_FORMATS, run_export

    if format_ not in EXPORT_FORMATS:
        raise typer.BadParameter(f"{format_!r}: use {' or '.join(EXPORT_FORMATS)}", param_hint="--format")
    with failing():
        result = run_export(model, format_, out, dynamic_batch=batch_size_dynamic, batch_size=batch_size,
                            opset=opset, atol=atol, seed=seed, trust_code=trust_code,
                            on_status=lambda m: err_console.print(f"[dim]{m}[/]"))
    console.print(f"parity: max abs diff {result.max_abs_diff:.3e} <= atol {result.atol:g} ({result.runtime})",
                  highlight=False)
    table = Table(title=f"cskd export -> {result.out}", show_header=False)
    for k, v in (("format", result.format), ("outputs", ", ".join(result.outputs)),
                 ("max abs diff", f"{result.max_abs_diff:.3e} ("
                                  + ", ".join(f"{k} {v:.1e}" for k, v in result.diffs.items()) + ")"),
                 ("size", f"{result.bytes / 2**20:,.1f} MiB"), ("sidecar", str(result.sidecar)),
                 ("time", f"{result.seconds:.1f} s")):
        table.add_row(k, v)
    show(table)
