"""ICoT-SI candidates side by side: every run's validation curve against CoT tokens removed and examples seen.

Each ``--run LABEL=METRICS`` names a stepwise stage's ``metrics.jsonl``; the plot has one colour per run
(exact match solid, token accuracy dotted), and the printed table gives, per run, exact match at a few
points of the schedule and the best exact match once the CoT is gone; ``--by-tokens`` adds a table per run with
the lowest and last exact match at each count of tokens removed.

    python benchmarks/si_curves.py --run 2L768d=runs/si-4x4/stepwise/metrics.jsonl \\
        --run 4L256d=runs/si-4x4-4l256d/stepwise/metrics.jsonl --out results/si-4x4/candidates.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from icot.pipeline import plot_stepwise, stepwise_validations


def summary(metrics: str | Path) -> dict[str, float | None]:
    """Steps, examples, the last removal reached, and the best exact match before and after the CoT is
    gone (a validation's ``val_eligible`` says whether it was)."""
    vals = stepwise_validations(metrics)
    if not vals:
        return {"validations": 0}
    gone = [v for v in vals if v.get("val_eligible") == 1.0]
    partly = [v for v in vals if v.get("val_eligible") != 1.0]
    last = vals[-1]
    return {"validations": len(vals), "steps": last["step"], "examples": last["examples"],
            "cot_removed": last["val_cot_removed"],
            "best_exact_with_cot_left": max((v["val_accuracy"] for v in partly), default=None),
            "best_exact_cot_gone": max((v["val_accuracy"] for v in gone), default=None),
            "last_exact": last["val_accuracy"], "last_token_accuracy": last["val_token_accuracy"]}


def by_tokens(metrics: str | Path) -> list[dict[str, float]]:
    """One row per count of CoT tokens removed, in order: the step of its first validation, how many
    validations saw it, and the lowest and the last exact match among them (how far the removal threw the
    model, and how far it came back before the next token went)."""
    rows: list[dict[str, float]] = []
    for v in stepwise_validations(metrics):
        if not rows or rows[-1]["tokens_removed"] != v["val_cot_removed"]:
            rows.append({"tokens_removed": v["val_cot_removed"], "from_step": v["step"], "validations": 0,
                         "lowest_exact": v["val_accuracy"]})
        row = rows[-1]
        row["validations"] += 1
        row["lowest_exact"] = min(row["lowest_exact"], v["val_accuracy"])
        row["last_exact"], row["last_token_accuracy"] = v["val_accuracy"], v["val_token_accuracy"]
    return rows


def by_tokens_markdown(label: str, rows: list[dict[str, float]]) -> str:
    """:func:`by_tokens` as a Markdown table (percentages)."""
    lines = [f"{label}", "", "| tokens removed | from step | validations | lowest exact | last exact / token |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['tokens_removed']:g} | {r['from_step']:g} | {r['validations']:g} | {100 * r['lowest_exact']:.1f} "
              f"| {100 * r['last_exact']:.1f} / {100 * r['last_token_accuracy']:.1f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, metavar="LABEL=METRICS",
                    help="a label and a stepwise stage's metrics.jsonl (repeatable)")
    ap.add_argument("--out", required=True, help="PNG to write (a JSON summary goes beside it)")
    ap.add_argument("--title", default="ICoT-SI candidates", help="plot title")
    ap.add_argument("--by-tokens", action="store_true",
                    help="also print each run's table by tokens removed (lowest and last exact match of each)")
    args = ap.parse_args()
    runs = {}
    for item in args.run:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            ap.error(f"--run {item!r}: expected LABEL=METRICS")
        if not Path(path).is_file():
            ap.error(f"--run {item!r}: {path} is not a file")
        runs[label] = path
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_stepwise(runs, out, args.title)
    table = {label: summary(path) for label, path in runs.items()}
    out.with_suffix(".json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    for label, row in table.items():
        print(label, json.dumps(row))
    if args.by_tokens:
        for label, path in runs.items():
            print("\n" + by_tokens_markdown(label, by_tokens(path)))


if __name__ == "__main__":
    main()
