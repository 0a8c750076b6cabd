"""What every benchmark does with its rows: a Markdown table on stdout (--markdown) and CSV lines appended to a
file (--csv), so reruns on other machines accumulate in one place."""

from __future__ import annotations

import csv
from pathlib import Path


def write_outputs(rows: list[dict], args, markdown, fields: list[str]) -> None:
    if args.markdown:
        print()
        print(markdown(rows))
    if args.csv:
        new = not Path(args.csv).exists()
        with open(args.csv, "a", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=fields)
            if new:
                wr.writeheader()
            for r in rows:
                wr.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
