"""Where the time goes: the training loop against a bare PyTorch loop, and implicit inference at batch 1.

Training: the shared loop (``train_stage``, the teacher stage of a config) for ``--steps`` optimizer
steps without validation, against a bare ``forward / backward / AdamW.step`` loop over the same
batches of the same model. The gap is the loop's own cost (Accelerate, logging, curriculum hooks).

Inference: per-example milliseconds at batch 1 of the no-CoT model (one prefill plus decoding) and of
the implicit model split into its parts: the emulator's prefill (hooks, MLPs, LSTM over layers), the
student's prefill with the emulated states, and the whole ``generate`` call.

    python benchmarks/profile_paths.py --config benchmarks/mult-4x4.yaml --run runs/mult-4x4 \
        --out results/mult-4x4/profile.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from icot.config import IcotConfig, load_config
from icot.data import read_examples
from icot.evaluation import load_predictor, write_json
from icot.generation import left_pad
from icot.training.loop import train_stage
from icot.training.stages import build as build_stage


def median_ms(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each call in milliseconds, after two warm-up rounds.

    The calls are interleaved round by round, so that load from other processes on shared cores slows
    every one of them alike and their ratios stay meaningful.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(repeats + 2):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
    return {f"{name}_ms": round(1000 * sorted(t)[len(t) // 2], 3) for name, t in times.items()}


def profile_training(config: IcotConfig, steps: int) -> dict:
    """Seconds per optimizer step: the shared loop against a bare loop on the same model and batches."""
    cfg = dataclasses.replace(config.teacher, max_steps=steps, max_minutes=0, eval_every=0, log_every=steps,
                              save_every=0, warmup_steps=0)
    config = dataclasses.replace(config, teacher=cfg)
    stage = build_stage("teacher", config)
    with tempfile.TemporaryDirectory() as out:
        train_stage(stage, cfg, out, config, progress=False)
        # The train event's clock stops before the closing validation, which is not the loop's cost.
        events = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        loop_s = next(e["seconds"] for e in events if e["event"] == "train" and e["step"] == steps) / steps

    stage = build_stage("teacher", config)  # fresh weights: the same work as the loop did
    model = stage.module
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    loader = torch.utils.data.DataLoader(list(stage.train_items), batch_size=cfg.batch_size, shuffle=True,
                                         collate_fn=stage.collate)
    batches = iter(loader)
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = stage.loss(model, next(batches))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad()
    bare_s = (time.perf_counter() - start) / steps
    return {"batch_size": cfg.batch_size, "steps": steps, "loop_s_per_step": round(loop_s, 6),
            "bare_s_per_step": round(bare_s, 6), "loop_overhead": round(loop_s / bare_s - 1, 4),
            "loop_examples_per_s": round(cfg.batch_size / loop_s, 1)}


@torch.no_grad()
def profile_inference(run: str, test: str, repeats: int) -> dict:
    """Per-example ms at batch 1: no-CoT generate, and the implicit model's parts and whole."""
    example = read_examples(test, allow_empty_cot=True)[0]
    nocot = load_predictor(str(Path(run) / "nocot"))
    implicit = load_predictor(str(Path(run) / "implicit"))
    model, layout = implicit.model, implicit.layout
    ids, mask = left_pad([layout.prompt_ids(example.input)], layout.pad_id)  # (1, T)
    s1 = torch.tensor([ids.shape[1] - 1])
    z = model.emulator(ids, mask, s1).states  # (1, L, H)
    calls = {
        "nocot_generate": lambda: nocot.predict([example.input]),
        "nocot_prefill": lambda: nocot.model(input_ids=ids, attention_mask=mask),
        "implicit_generate": lambda: implicit.predict([example.input]),
        "emulator_prefill": lambda: model.emulator(ids, mask, s1),
        "student_prefill": lambda: model.student(ids, mask, s1, z),
    }
    report = {"prompt_tokens": ids.shape[1], **median_ms(calls, repeats)}
    report["implicit_vs_nocot_speed"] = round(report["nocot_generate_ms"] / report["implicit_generate_ms"], 3)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="pipeline config (its teacher section is profiled)")
    ap.add_argument("--run", required=True, help="pipeline run directory holding nocot/ and implicit/")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per training measurement")
    ap.add_argument("--repeats", type=int, default=50, help="calls per inference measurement")
    args = ap.parse_args()
    config = load_config(args.config)
    report = {"threads": torch.get_num_threads(),
              "training": profile_training(config, args.steps),
              "inference": profile_inference(args.run, config.data.test, args.repeats)}
    write_json(report, args.out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
