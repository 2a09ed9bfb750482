"""ICoT-KD candidates side by side: each stage's validation curve against examples seen.

Each ``--run LABEL=DIR`` names a pipeline output directory (or any directory holding ``student/``,
``emulator/``, ``couple/`` and optionally ``nocot/`` stage directories); stages a run has not reached
are left out. The plot has up to three panels, each drawn only when some run reached it: the student
reading the teacher's states (its exact match is ICoT-KD's ceiling), the emulator's R² against the
teacher states, and the coupled model beside the no-CoT model (exact match solid, token accuracy
dotted). The printed table, also written as JSON beside the plot, gives each stage's best validation and
its examples.

    python benchmarks/kd_curves.py --run 4L256d=runs/si-3x3 --out results/kd-candidates/3x3.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from icot.pipeline import save_figure, validations

STAGES = ("student", "emulator", "couple", "nocot")


def score_key(stage: str) -> str:
    """The validation field a stage is ranked and drawn by: R² for the emulator, exact match otherwise."""
    return "val_r2" if stage == "emulator" else "val_accuracy"


def stage_validations(run_dir: Path, stage: str) -> list[dict[str, Any]]:
    """The validation records of ``run_dir/stage/metrics.jsonl`` that carry the stage's score, in order ([] for
    a stage not reached; an emulator validation has no R² when no layer's teacher state varied)."""
    path = run_dir / stage / "metrics.jsonl"
    return [v for v in validations(path) if score_key(stage) in v] if path.is_file() else []


def best(vals: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The validation with the highest ``key`` (the earliest of ties); ``vals`` all carry it."""
    return max(vals, key=lambda v: (v[key], -v["step"]))


def summary(run: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per stage of one run's validations (a value of :func:`run_validations`): validations, examples seen, best
    exact match (R² for the emulator) and where."""
    out: dict[str, Any] = {}
    for stage in STAGES:
        vals = run[stage]
        if not vals:
            continue
        key = score_key(stage)
        top = best(vals, key)
        out[stage] = {"validations": len(vals), "examples": vals[-1]["examples"], "best_" + key: top[key],
                      "best_at_examples": top["examples"], "last_token_accuracy": vals[-1].get("val_token_accuracy")}
    return out


EXACT = "dev exact match (dotted: token accuracy)"
# Each panel: its stages, title and y label. A panel no run has reached is left out of the figure.
PANELS = (
    (("student",), "student on teacher states (ceiling)", EXACT),
    (("emulator",), "emulator R² (dotted: per layer)", "R² against the teacher states"),
    (("couple", "nocot"), "coupled model (dashed: no-CoT)", EXACT),
)


def run_validations(runs: dict[str, Path]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{label: {stage: validations}}``, each metrics file read once."""
    return {label: {stage: stage_validations(d, stage) for stage in STAGES} for label, d in runs.items()}


def panels_reached(vals: dict[str, dict[str, list[dict[str, Any]]]]) -> list[tuple[tuple[str, ...], str, str]]:
    """The panels of ``PANELS`` for which at least one run of ``vals`` (:func:`run_validations`) has validations."""
    return [panel for panel in PANELS if any(run[stage] for run in vals.values() for stage in panel[0])]


def draw_exact(ax, vals: list[dict[str, Any]], label: str, colour: str, style: str) -> None:
    """A stage's dev exact match (``style``) and token accuracy (dotted) against examples seen."""
    if not vals:
        return
    x = [v["examples"] for v in vals]
    ax.plot(x, [v["val_accuracy"] for v in vals], style, color=colour, label=f"{label} exact")
    if "val_token_accuracy" in vals[0]:
        ax.plot(x, [v["val_token_accuracy"] for v in vals], ":", color=colour, alpha=0.7)


def draw_r2(ax, vals: list[dict[str, Any]], label: str, colour: str) -> None:
    """The emulator's mean R² (solid) and each layer's (dotted) against examples seen."""
    if not vals:
        return
    x = [v["examples"] for v in vals]
    ax.plot(x, [v["val_r2"] for v in vals], "-", color=colour, label=f"{label} mean")
    for k in sorted(k for k in vals[0] if k.startswith("val_r2_layer_")):
        ax.plot(x, [v.get(k) for v in vals], ":", color=colour, alpha=0.5)


def plot(vals: dict[str, dict[str, list[dict[str, Any]]]], path: Path) -> None:
    """One panel per stage group some run of ``vals`` (:func:`run_validations`) reached (student, emulator,
    couple with no-CoT); one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panels_reached(vals)
    if not panels:
        raise ValueError(f"no stage of run {', '.join(vals)} has a validation to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (stages, title, ylabel) in zip(axes[0], panels):
        for i, (label, run) in enumerate(vals.items()):
            colour = f"C{i}"
            for stage in stages:
                if stage == "emulator":
                    draw_r2(ax, run[stage], label, colour)
                elif stage == "nocot":
                    draw_exact(ax, run[stage], f"{label} no-CoT", colour, "--")
                else:
                    draw_exact(ax, run[stage], label, colour, "-")
        ax.set_title(title)
        ax.set_xlabel("training examples")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, metavar="LABEL=DIR",
                    help="a label and a directory holding the KD stage directories (repeatable)")
    ap.add_argument("--out", required=True, help="PNG to write (a JSON summary goes beside it)")
    args = ap.parse_args()
    runs = {}
    for spec in args.run:
        label, sep, directory = spec.partition("=")
        if not sep or not Path(directory).is_dir():
            raise SystemExit(f"--run {spec!r}: expected LABEL=DIR with DIR an existing directory")
        runs[label] = Path(directory)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    vals = run_validations(runs)
    try:
        plot(vals, out)
    except ValueError as e:  # no run has a validation yet
        raise SystemExit(f"{e} ({', '.join(map(str, runs.values()))})") from None
    table = {label: summary(run) for label, run in vals.items()}
    out.with_suffix(".json").write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    for label, stages in table.items():
        for stage, s in stages.items():
            print(f"{label:>12} {stage:>8}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                           for k, v in s.items()))
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
