"""Training at this machine's limit: matmul peak against what a stage's training loop achieves.

1. The peak: the best of several square matmuls (fp32, and bf16 where the CPU multiplies it natively) on
   ``--threads`` threads; each stage's achieved FLOP/s is given as a fraction of the higher peak (``of_peak``;
   ``results/speed/train_speed.json``, measured before this field was renamed, calls it ``of_bf16_peak``).
2. The stepwise stage's two ends, on the shared training loop (``train_stage``) for ``--steps`` optimizer
   steps each: its first step trains on whole explicit-CoT rows, exactly the ``teacher`` stage's batches,
   and once the CoT is gone on ``INPUT <sep> ANSWER <eos>`` rows, exactly the ``nocot`` stage's; so those
   two stages are timed, for each ``--shapes`` entry, with and without bf16 autocast. Examples/s comes from
   the loop's own train logs (first log to last), so start-up and the final validation do not count;
   FLOP/s counts the model's matmuls.

Prints one line per measurement and the ratio of achieved FLOP/s to that peak, and writes JSON.

    python benchmarks/train_speed.py --data runs/si-4x4/data/train.txt --out results/speed/train_speed.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from icot.config import load_config
from icot.devices import cpu_bf16_speedup, cpu_runs_bf16_natively
from icot.training.loop import train_stage
from icot.training.stages import build as build_stage


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 4096), repeats: int = 5) -> dict[str, float]:
    """Best GFLOP/s of ``n x n @ n x n`` over ``sizes``, after one warm-up product each."""
    best = {}
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best[str(n)] = 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9
    return {"gflops": max(best.values()), "by_size": best}


def train_flops_per_row(n_layer: int, n_embd: int, vocab: int, tokens: int) -> float:
    """Matmul FLOPs of one training row (forward + backward = 3 x forward) of a GPT-2 block stack.

    Per token: QKV, attention output and the MLP are ``2 * 12 * H^2`` per layer, the LM head ``2 * H * V``;
    attention scores and their weighted sum add ``2 * 2 * T * H`` per layer (full T x T, as SDPA computes).
    """
    per_token = n_layer * (24 * n_embd ** 2 + 4 * tokens * n_embd) + 2 * n_embd * vocab
    return 3 * per_token * tokens


def train_rate(metrics: Path) -> tuple[float, float]:
    """(examples/s, seconds) between the first and the last train log of a metrics.jsonl."""
    logs = [r for r in map(json.loads, metrics.read_text().splitlines()) if r["event"] == "train"]
    first, last = logs[0], logs[-1]
    seconds = last["seconds"] - first["seconds"]
    return (last["examples"] - first["examples"]) / seconds, seconds


def measure_stage(name: str, data: Path, valid: Path, shape: tuple[int, int, int], batch_size: int, steps: int,
                  mixed_precision: str, compile_: bool = False) -> dict[str, float]:
    """Examples/s and achieved GFLOP/s of stage ``name``'s training loop on ``shape = (L, H, heads)``."""
    n_layer, n_embd, n_head = shape
    section = {"batch_size": batch_size, "lr": 5e-5, "max_steps": steps, "eval_every": 0, "eval_examples": 8,
               "eval_batch_size": 8, "log_every": max(1, steps // 6), "mixed_precision": mixed_precision,
               "compile": compile_}
    config = load_config(overrides={
        "data": {"train": str(data), "valid": str(valid), "test": str(valid)},
        "model": {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "n_positions": 256},
        name: section,
    })
    stage = build_stage(name, config)
    tokens = max(len(e.ids) for e in stage.train_items)
    with tempfile.TemporaryDirectory() as out:
        train_stage(stage, getattr(config, name), Path(out) / "stage", config, progress=False)
        rate, seconds = train_rate(Path(out) / "stage" / "metrics.jsonl")
    flops = train_flops_per_row(n_layer, n_embd, len(stage.tokenizer), tokens) * rate
    return {"stage": name, "layers": n_layer, "width": n_embd, "heads": n_head, "batch_size": batch_size, "tokens": tokens,
            "mixed_precision": mixed_precision, "compile": compile_, "examples_per_second": rate, "gflops": flops / 1e9,
            "timed_seconds": seconds}


def measure_peaks(threads: int, bf16: bool) -> dict[str, dict]:
    """fp32 matmul peak and, with ``bf16``, the bf16 one, printed."""
    peaks = {"float32": matmul_peak(torch.float32)}
    if bf16:
        peaks["bfloat16"] = matmul_peak(torch.bfloat16)
    for name, p in peaks.items():
        print(f"matmul peak {name}: {p['gflops']:.0f} GFLOP/s ({threads} threads)", flush=True)
    return peaks


def best_peak(peaks: dict[str, dict]) -> str:
    """The dtype whose peak is highest: what a stage's achieved FLOP/s is compared with."""
    return max(peaks, key=lambda name: peaks[name]["gflops"])


def parse_shape(text: str) -> tuple[int, int, int]:
    """``2x768x4`` -> (layers, width, heads)."""
    layers, width, heads = (int(x) for x in text.lower().split("x"))
    return layers, width, heads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="training file (INPUT||COT #### ANSWER lines)")
    ap.add_argument("--lines", type=int, default=4000, help="training lines the stage loads")
    ap.add_argument("--shapes", nargs="+", default=["2x768x4", "2x512x4", "4x256x4", "4x384x6"],
                    help="LAYERSxWIDTHxHEADS of from-scratch GPT-2s")
    ap.add_argument("--batch-size", type=int, default=32, help="training batch size")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per measurement")
    ap.add_argument("--precisions", nargs="+", default=["bf16", "no"], help="mixed_precision values to compare")
    ap.add_argument("--compile", choices=["no", "yes", "both"], default="no",
                    help="torch.compile the training forward (its compilation happens before the first train log)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    # A CPU without native bf16 emulates it 60-250x slower than fp32: its bf16 peak would take hours to measure
    # at these sizes and its bf16 stages would not be a lever, so both are left out there.
    native_bf16, why = cpu_runs_bf16_natively()
    if not native_bf16:  # the slowdown is measured for this message only (a few seconds where bf16 is emulated)
        speedup = cpu_bf16_speedup()
        print(f"no bf16 peak or stage: {why} (a bf16 product of 512 ran {1 / speedup:.0f}x slower than fp32 here)",
              flush=True)
        args.precisions = [x for x in args.precisions if x != "bf16"] or ["no"]
    peaks = measure_peaks(args.threads, native_bf16)
    peak = best_peak(peaks)
    lines = Path(args.data).read_text(encoding="utf-8").splitlines(keepends=True)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        train, valid = Path(tmp) / "train.txt", Path(tmp) / "valid.txt"
        train.write_text("".join(lines[: args.lines]), encoding="utf-8")
        valid.write_text("".join(lines[-8:]), encoding="utf-8")
        for shape in args.shapes:
            for name in ("teacher", "nocot"):
                for precision in args.precisions:
                    for compile_ in {"no": [False], "yes": [True], "both": [False, True]}[args.compile]:
                        r = measure_stage(name, train, valid, parse_shape(shape), args.batch_size, args.steps,
                                          precision, compile_)
                        r["of_peak"] = r["gflops"] / peaks[peak]["gflops"]
                        runs.append(r)
                        print(f"{name:>7} {shape} {precision:>4}{' compiled' if compile_ else ''} ({r['tokens']} tokens): "
                              f"{r['examples_per_second']:.1f} examples/s, {r['gflops']:.0f} GFLOP/s = "
                              f"{100 * r['of_peak']:.0f}% of the {peak} peak", flush=True)
    # Measured again at the end: a peak read while something else held the cores would flatter the stages.
    again = measure_peaks(args.threads, native_bf16)
    for name in peaks:
        if again[name]["gflops"] > peaks[name]["gflops"]:
            peaks[name] = again[name]
    peak = best_peak(peaks)
    for r in runs:
        r["of_peak"] = r["gflops"] / peaks[peak]["gflops"]
    print(f"{peak} peak used for the ratios: {peaks[peak]['gflops']:.0f} GFLOP/s; stage / peak: "
          + ", ".join(f"{r['stage']} {r['layers']}x{r['width']} {r['mixed_precision']}{'+compile' if r['compile'] else ''} "
                      f"{100 * r['of_peak']:.0f}%" for r in runs))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "peaks": peaks, "peak": peak, "bf16_speedup_512": speedup,
                               "stages": runs, "args": {k: v for k, v in vars(args).items() if k != "out"}},
                              indent=2) + "\n")


if __name__ == "__main__":
    main()
