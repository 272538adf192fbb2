"""The training curve of a selfkd run: loss per branch and held-out eval JSD against the step,
drawn with matplotlib from <output_dir>/metrics.jsonl into <output_dir>/curve.png.

    python curve.py OUTPUT_DIR [--out FILE.png]      (or: python selfkd.py curve OUTPUT_DIR)

selfkd writes it at the end of every run (and when SIGTERM stops one); this draws it for any
output directory, also while its run is still going.
"""
from __future__ import annotations

import argparse
import json
import os

# the colour of each branch's loss points, and what the legend calls it
BRANCHES = {"dataset": ("tab:blue", "loss, dataset completions"),
            "on-policy": ("tab:orange", "loss, on-policy (student-sampled) completions"),
            "teacher-sampled": ("tab:green", "loss, teacher-sampled completions (--seq_kd)")}


def read_metrics(output_dir: str) -> list[dict]:
    """The rows of metrics.jsonl: one per step (with loss and branch), and eval-only rows."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.jsonl in {output_dir!r} (not a selfkd output directory, or no step "
                                "has finished yet)")
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                continue
    return rows


def moving_average(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def write_curve(output_dir: str, out: str | None = None) -> str:
    """Draw the curve and return the path of the PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = read_metrics(output_dir)
    steps = [r for r in rows if "loss" in r]
    evals = sorted((r["step"], r["eval_jsd"]) for r in rows if "eval_jsd" in r)
    if not steps and not evals:
        raise ValueError(f"{output_dir}/metrics.jsonl holds no step yet")
    out = out or os.path.join(output_dir, "curve.png")
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    for branch, (colour, label) in BRANCHES.items():
        points = [(r["step"], r["loss"]) for r in steps if r.get("branch") == branch]
        if points:
            ax.plot(*zip(*points), ".", color=colour, alpha=0.6, label=label)
    if len(steps) > 1:
        width = max(1, len(steps) // 20)
        label = f"loss, moving average of {width} steps" if width > 1 else "loss, all branches"
        ax.plot([r["step"] for r in steps], moving_average([r["loss"] for r in steps], width), "-", color="gray",
                linewidth=1, label=label)
    if evals:
        ax.plot(*zip(*evals), "o-", color="black", linewidth=2, label="eval JSD per token (held-out rows)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("generalized JSD per completion token")
    ax.set_title(f"selfkd: {os.path.abspath(output_dir)}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="curve.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir")
    parser.add_argument("--out", help="the PNG to write (default: OUTPUT_DIR/curve.png)")
    args = parser.parse_args(argv)
    try:
        print(f"curve: {write_curve(args.output_dir, args.out)}")
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"curve.py: error: {err}\n")


if __name__ == "__main__":
    main()
