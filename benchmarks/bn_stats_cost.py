"""What `cskd distill --bn-stats` costs per training step: one forward of labelled + unlabelled items (joint) against
a forward each (separate; labelled also holds the running statistics still through the second).

    python benchmarks/bn_stats_cost.py                      # mobilenetv3_small_100, 128 px, 32 + 32 items
    python benchmarks/bn_stats_cost.py --model resnet18 --size 224 --device cuda

What is timed: forward, a loss on every output, backward and an AdamW step of a random-init timm model, through
the forwards `stages.iaa_task.IAATask` runs (`models.batch_norm.forward_split` for separate and labelled).
Inputs are made once; data loading is the same in every mode and is left out. The three modes run interleaved
step by step, so drift on a shared machine hits all three alike, and the ratios to joint are printed per half of
the run: read the ratios, not the absolute steps/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("joint", "separate", "labelled")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilenetv3_small_100", help="timm model (random init)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--labelled", type=int, default=32, help="labelled items per step")
    p.add_argument("--unlabelled", type=int, default=32, help="unlabelled items per step")
    p.add_argument("--steps", type=int, default=40, help="timed steps per mode in each half")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)

    import timm
    import torch

    from cskd_cache.models.batch_norm import bn_layers, forward_split

    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    model = timm.create_model(a.model, num_classes=10).train().to(dev)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(a.labelled + a.unlabelled, 3, a.size, a.size, device=dev)
    layers = bn_layers(model)

    def step(mode: str) -> None:
        if mode == "joint":
            out = model(x)
        else:
            out = torch.cat(forward_split(model, x, a.labelled, layers if mode == "labelled" else []))
        loss = out.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for mode in MODES:
        for _ in range(3):
            step(mode)
    rates = {m: [] for m in MODES}
    for _ in range(2):
        spent = dict.fromkeys(MODES, 0.0)
        for _ in range(a.steps):
            for mode in MODES:
                t = time.perf_counter()
                step(mode)
                spent[mode] += time.perf_counter() - t
        for mode in MODES:
            rates[mode].append(a.steps / spent[mode])
    print(f"{a.model} at {a.size} px, {a.labelled} + {a.unlabelled} items per step, {len(layers)} batch-norm layers, "
          f"{a.device}, {a.threads} threads")
    print("| --bn-stats | steps/s (two halves) | vs joint |")
    print("|---|---|---|")
    for mode, v in rates.items():
        print(f"| {mode} | {' / '.join(f'{r:.2f}' for r in v)} | "
              f"{' / '.join(f'{r / j:.2f}x' for r, j in zip(v, rates['joint']))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
