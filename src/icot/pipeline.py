"""``icot pipeline``: teacher -> student -> emulator -> couple, the no-CoT baseline, then evaluation.

Every stage writes its own directory under ``RUN_DIR``; a stage whose directory already holds a
finished run of the same resolved config is skipped, and an unfinished one with a checkpoint
(``save_every``, SIGINT/SIGTERM) resumes from it, so an interrupted pipeline continues where it stopped.
The results go to ``RUN_DIR/results.json``, ``RUN_DIR/results.md`` and
``RUN_DIR/accuracy_vs_speed.png`` and ``RUN_DIR/accuracy_by_digit.png`` (with ``icot-kd``, each of its stages
measured on its own: :mod:`icot.kd_quality`; with ``eval.probe_lines``, the linear probes of every method's
states in ``RUN_DIR/probes/``); the implicit model is ``RUN_DIR/implicit/``. Under
``accelerate launch`` every process trains; the main process alone generates data and evaluates.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from icot.config import IcotConfig, load_config, output_settings, parse_sizes
from icot.data import Example, read_examples
from icot.data.multiplication import write_training_file
from icot.devices import decode_device, process_state
from icot.errors import ConfigError, DataFormatError
from icot.evaluation import (
    Predictor,
    check_inputs,
    check_prompts,
    evaluate,
    evaluate_sizes,
    load_predictor,
    write_json,
)
from icot.kd_quality import kd_stage_quality
from icot.probe import best_layers, plot_probe, probe_model, problem_size
from icot.rundir import can_resume, read_meta, stage_is_done
from icot.tokenizer import Layout
from icot.training import stages
from icot.training.causal_lm import check_lengths, load_split, starting_tokenizer
from icot.training.loop import checkpoint_refusal

# Method -> (row name, the stage whose model answers).
METHOD_ROWS = {"nocot": ("no-cot", "nocot"), "explicit": ("explicit-cot", "teacher"), "icot-kd": ("icot-kd", "couple"),
               "icot-si": ("icot-si", "stepwise")}
BATCHED_ROW = {"nocot": "no-cot-batched", "explicit": "explicit-cot-batched", "icot-kd": "icot-kd-batched",
               "icot-si": "icot-si-batched"}
# Training fields that change how fast a stage trains, not what it learns: a finished stage is reused across them.
SPEED_FIELDS = ("mixed_precision", "compile")


def stages_for(config: IcotConfig) -> list[str]:
    """The stages ``config.methods`` need, in training order: each method's answering stage and,
    transitively, the stages whose directories it reads (``icot-si`` reads the teacher only when stepwise
    internalization starts from it, ``si.from_teacher``)."""
    need: set[str] = set()
    todo = [METHOD_ROWS[m][1] for m in config.methods]
    while todo:
        name = todo.pop()
        if name not in need:
            need.add(name)
            todo += stages.needs(name, config)
    return [s for s in stages.ORDER if s in need]


def generate_data(config: IcotConfig, run_dir: Path) -> IcotConfig:
    """Write the generated train/valid files of ``data.generate`` (once) and point the config at them."""
    gen = config.data.generate
    if gen is None:
        return config
    data_dir = run_dir / "data"
    train, valid = data_dir / "train.txt", data_dir / "valid.txt"
    test = Path(config.data.test) if config.data.test else data_dir / "test.txt"
    if not config.data.test and not gen.test_count:
        raise ConfigError("field 'data.test' is empty: give a test file or data.generate.test_count")
    stamp = data_dir / "generate.json"
    wanted = {**dataclasses.asdict(gen), "test": config.data.test}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == wanted):
        digits_b = gen.digits_b or gen.digits
        if not config.data.test:
            write_training_file(test, gen.digits, digits_b, gen.test_count, gen.seed + 2)
        write_training_file(train, gen.digits, digits_b, gen.train_count, gen.seed, [test])
        write_training_file(valid, gen.digits, digits_b, gen.valid_count, gen.seed + 1, [test, train])
        stamp.write_text(json.dumps(wanted, indent=2))
    data = dataclasses.replace(config.data, train=str(train), valid=str(valid), test=str(test))
    return dataclasses.replace(config, data=data)


def _same_config(stage_dir: Path, config: IcotConfig, sections: tuple[str, ...]) -> bool:
    # Read through load_config: a saved field that is unknown or out of range is a one-line error naming
    # the file, and fields added since the stage ran compare at their defaults. A finished stage is reused
    # whatever precision it trained in (bf16 on one machine, fp32 on another) and whether it was compiled: that
    # is speed and rounding, not what the stage is.
    saved = load_config(stage_dir / "config.yaml")

    def settings(c: IcotConfig) -> dict[str, Any]:
        return {k: v for k, v in output_settings(c, sections).items() if k.rsplit(".", 1)[-1] not in SPEED_FIELDS}

    return settings(saved) == settings(config)


def check_data(config: IcotConfig) -> None:
    """Read and tokenize every file the run uses before the first stage trains, so that an unreadable,
    malformed or out-of-vocabulary line is found in seconds rather than after the stages.

    Train, valid and test lines are parsed (``INPUT||COT #### ANSWER``); valid lines and test inputs are
    tokenized with the vocabulary built from the training file (or the pretrained model's; a stage that
    starts from ``init_from`` checks against its own when it is built); test prompts, and the training and
    validation lines in the longest layout a stage reads, are checked against the starting model's context
    (``model.n_positions`` from scratch, the pretrained model's ``max_position_embeddings``): nothing is truncated.

    Raises:
        DataFormatError: naming the file and the 1-based line of the first bad line.
        ConfigError: ``FILE:LINE`` of the first training or validation line longer than the context.
    """
    train, valid = load_split(config, "train"), load_split(config, "valid")
    test = read_examples(config.data.test, allow_empty_cot=True)
    layout = Layout(starting_tokenizer(config, train))
    valid_items = layout.encode_all(valid, True, config.data.valid)
    context = context_of(config)
    check_prompts(layout, context, [ex.input for ex in test], config.data.test)
    # Every stage but the no-CoT one reads the explicit layout (the teacher, the distillation stages' teacher
    # inputs, stepwise's starting format): training and validation lines must fit it, as each stage checks.
    with_cot = stages_for(config) != ["nocot"]
    check_lengths(layout.encode_all(train, with_cot, config.data.train), context, config.data.train)
    check_lengths(valid_items if with_cot else layout.encode_all(valid, False, config.data.valid), context,
                  config.data.valid)
    if config.eval.probe_lines:
        probe_examples(config, train, test)
    for path in config.eval.saved_models:  # a saved model must load and read the test inputs too
        predictor = load_predictor(path, config.eval.max_new_tokens, "cpu")
        check_inputs(predictor, [ex.input for ex in test[: config.eval.limit or None]], config.data.test)


def context_of(config: IcotConfig) -> int | None:
    """The context length of the model the stages start from: ``model.n_positions`` from scratch, the pretrained
    model's ``max_position_embeddings`` (or ``n_positions``) read from its ``config.json`` (None when unbounded)."""
    if not config.model.name_or_path:
        return config.model.n_positions
    try:
        pretrained = AutoConfig.from_pretrained(config.model.name_or_path)
    except (OSError, ValueError):
        return None  # the first stage that loads the model reports what is wrong with it
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(pretrained, name, None)
        if isinstance(value, int):
            return value
    return None


def probe_examples(config: IcotConfig, train: list[Example], test: list[Example]
                   ) -> tuple[list[Example], list[Example]]:
    """The lines ``eval.probe_lines`` fits the probes on (training) and scores them on (test, ``eval.limit``).

    Raises:
        DataFormatError: naming the file and line of a problem that is not multiplication of one size, a test
            line without the CoT the probes read, or a file with fewer than 2 lines.
    """
    train, test = train[: config.eval.probe_lines], test[: config.eval.limit or None]
    size = problem_size(train, config.data.train)
    if problem_size(test, config.data.test) != size:
        raise DataFormatError(f"the test problems are not {size[0]}x{size[1]} like the training ones: the probes "
                              "(eval.probe_lines) need one size", config.data.test)
    missing = next((line for line, ex in enumerate(test, start=1) if not ex.cot), None)
    if missing is not None:
        raise DataFormatError("no CoT: the probes (eval.probe_lines) read the test lines' CoT", config.data.test, missing)
    for lines, path in ((train, config.data.train), (test, config.data.test)):
        if len(lines) < 2:
            raise DataFormatError(f"{len(lines)} line(s): the probes (eval.probe_lines) need at least 2", path)
    return train, test


def run_stages(config: IcotConfig, run_dir: Path, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Train (or skip, when already done with the same config) every stage the methods need."""
    report: dict[str, dict[str, Any]] = {}
    dirs = {name: str(run_dir / entry.directory) for name, entry in stages.REGISTRY.items()}
    for name in stages_for(config):
        out = Path(dirs[name])
        depends = stages.depends(name, config)
        if stage_is_done(out) and _same_config(out, config, depends):
            meta = read_meta(out)
            report[name] = {"skipped": True, **{k: meta.get(k) for k in ("seconds", "steps", "examples", "best",
                                                                          "stopped_by")}}
            print(f"[icot] stage {name}: already done in {out}, skipped")
            continue
        # An interrupted run continues from its checkpoint unless the config changed in a way it cannot
        # take on: like a finished stage of another config, it is then trained afresh, and says why.
        resume = can_resume(out)
        refusal = checkpoint_refusal(out, stages.settings(name, config, **dirs), name) if resume else None
        if refusal:
            print(f"[icot] stage {name}: not resuming its checkpoint ({refusal}); training afresh")
            resume = False
        print(f"[icot] stage {name} -> {out}" + (" (resuming from its checkpoint)" if resume else ""))
        result = stages.run(name, config, out, progress=progress, resume=resume,
                            **{need: dirs[need] for need in stages.needs(name, config)})
        report[name] = {"skipped": False, **result}
    return report


def evaluate_methods(config: IcotConfig, run_dir: Path, progress: bool = True
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """``(rows, by_size, probes)``: one row per method at ``eval.batch_size`` (the papers' batch 1), plus
    batched rows; with ``eval.sizes``, each method on generated problems of those sizes (none a training
    INPUT) at the batched size; with ``eval.probe_lines``, each method's probe summary (:func:`probe_method`).
    Each method's model is loaded once for all. ``eval.saved_models`` (models trained elsewhere) follow the
    methods, each row named by its directory."""
    test = read_examples(config.data.test, allow_empty_cot=True)
    sizes = parse_sizes(config.eval.sizes) if config.eval.sizes else []
    probing = probe_examples(config, load_split(config, "train"), test) if config.eval.probe_lines else None
    rows, by_size, probes = [], [], {}
    answering = [(method, str(run_dir / stages.spec(METHOD_ROWS[method][1]).directory)) for method in config.methods]
    for method, directory in answering + [(None, path) for path in config.eval.saved_models]:
        # A saved model's rows are named by its path: it was not trained by this run.
        row_name, batched_name = (METHOD_ROWS[method][0], BATCHED_ROW[method]) if method else (directory, f"{directory} batched")
        predictor = load_predictor(directory, config.eval.max_new_tokens, config.eval.device, config.eval.dtype)
        check_inputs(predictor, [ex.input for ex in test[: config.eval.limit or None]], config.data.test)
        batch_sizes = [(row_name, config.eval.batch_size)]
        if config.eval.batched_size:
            batch_sizes.append((batched_name, config.eval.batched_size))
        for name, batch_size in batch_sizes:
            r = evaluate(predictor, test, batch_size=batch_size, limit=config.eval.limit, progress=progress)
            rows.append({"method": name, **{k: r[k] for k in ("accuracy", "examples_per_second", "batch_size", "n",
                                                                "digit_accuracy")}})
            print(f"[icot] {name}: accuracy {r['accuracy']:.4f}, {r['examples_per_second']:.1f} examples/s "
                  f"at batch {batch_size}")
        if sizes:
            by_size += _by_size_rows(config, predictor, row_name, sizes, progress)
        if probing:
            probes[row_name] = probe_method(predictor, *probing, run_dir / "probes" / row_name.replace("/", "_"), config)
    return rows, by_size, probes


def kd_stages(config: IcotConfig, run_dir: Path, progress: bool = True) -> dict[str, Any]:
    """ICoT-KD stage by stage on the test file (:func:`icot.kd_quality.kd_stage_quality`), or ``{"skipped": why}``
    when the teacher cannot read the test lines' CoT: a line without one, a symbol its vocabulary lacks (a test
    file of another task than trained), a line longer than its context. The methods' rows do not need it."""
    test = read_examples(config.data.test, allow_empty_cot=True)
    dirs = {name: run_dir / stages.spec(name).directory for name in ("teacher", "student", "emulator")}
    try:
        kd = kd_stage_quality(config, dirs, test, progress)
    except (DataFormatError, ConfigError) as e:
        print(f"[icot] ICoT-KD stage by stage: not measured ({e})")
        return {"skipped": str(e)}
    r2 = " ".join("-" if v is None else f"{v:.2f}" for v in kd["emulator_r2"])
    print(f"[icot] ICoT-KD stage by stage: student on the teacher's states "
          f"{100 * kd['student_with_teacher_states']['accuracy']:.1f}%, emulator R² per layer {r2}, "
          f"emulator -> student before coupling {100 * kd['emulator_then_student']['accuracy']:.1f}%")
    return kd


def probe_method(predictor: Predictor, train: list[Example], test: list[Example], out: Path, config: IcotConfig
                 ) -> dict[str, Any]:
    """``icot probe`` on one method's model: ``OUT.json`` and the heatmaps ``OUT.png``; returns the best-layer
    summary (:func:`icot.probe.best_layers`) with the paths."""
    result = {"model": out.name, "train_file": config.data.train, "test_file": config.data.test,
              **probe_model(predictor, train, test, 1.0, config.data.train, config.data.test)}
    write_json(result, out.with_suffix(".json"))
    plot_probe(result, str(out.with_suffix(".png")), f"{out.name}: what a linear probe reads")
    print(f"[icot] probe {out.name}: best-layer R² of the running sums "
          + " ".join(f"{v:.2f}" for v in best_layers(result)["r2"]))
    return {**best_layers(result), "layers": result["layers"], "train": result["train"], "test": result["test"],
            "json": str(out.with_suffix(".json")), "plot": str(out.with_suffix(".png"))}


def _by_size_rows(config: IcotConfig, predictor: Predictor, row_name: str, sizes: list[tuple[int, int]],
                  progress: bool) -> list[dict[str, Any]]:
    """One method's rows of the by-size table, at the batched size."""
    rows = []
    for r in evaluate_sizes(predictor, sizes, config.eval.sizes_count, config.eval.sizes_seed,
                            config.eval.batched_size or config.eval.batch_size, [config.data.train], progress):
        rows.append({"method": row_name, **r})
        shown = f"{100 * r['accuracy']:.1f}%" if "accuracy" in r else f"not scored ({r['error']})"
        print(f"[icot] {row_name} on {r['size']}: {shown}")
    return rows


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(device: str = "auto", dtype: str = "float32") -> dict[str, Any]:
    """Where the numbers were measured: the machine, and the device and dtype the models decoded with."""
    place = decode_device(device)
    name = torch.cuda.get_device_name(place) if place.type == "cuda" else place.type
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "torch": torch.__version__, "device": name, "dtype": dtype}


def _dtype_note(dtype: str) -> str:
    return "" if dtype == "float32" else f" ({dtype} weights)"


def _kept(best: dict[str, Any]) -> str:
    """The kept model's validation figures, in percent, with the number of lines each figure used."""
    if not best:
        return "-"
    parts = []
    if "exact_examples" in best:  # the emulator decodes nothing: its accuracy is a placeholder
        parts.append(f"exact match {100 * best['accuracy']:.1f}% of {best['exact_examples']:.0f} lines")
    if "loss" in best:
        parts.append(f"validation loss {best['loss']:.4g}" + (f" on {best['examples']:.0f} lines" if "examples" in best else ""))
    if "step" in best:
        parts.append(f"step {best['step']}")
    return ", ".join(parts)


def _by_size_table(rows: list[dict[str, Any]]) -> list[str]:
    """Exact match (%) by operand size, one row per method (``-`` where prompts do not fit the context)."""
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["size"]): (f"{100 * r['accuracy']:.1f}%" if "accuracy" in r else "-") for r in rows}
    n = next((r["n"] for r in rows if "n" in r), 0)
    out = [f"Exact match by operand size ({n} generated problems per size, none a training INPUT; "
           "'-': prompts longer than the context):", "",
           "| method | " + " | ".join(sizes) + " |", "| --- |" + " --- |" * len(sizes)]
    out += ["| " + m + " | " + " | ".join(cell.get((m, z), "") for z in sizes) + " |" for m in methods]
    return out


def _digits_row(name: str, exact: float, digits: list[float]) -> str:
    return f"| {name} | {100 * exact:.1f}% | " + " | ".join(f"{100 * d:.0f}%" for d in digits) + " |"


def _kd_table(kd: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """ICoT-KD stage by stage: exact match and per-digit accuracy of the student's ceiling, of the uncoupled
    pair and of the coupled model, then the emulator's R² per layer."""
    if "skipped" in kd:
        return [f"ICoT-KD stage by stage: not measured ({kd['skipped']})."]
    ceiling, pair = kd["student_with_teacher_states"], kd["emulator_then_student"]
    coupled = next((r for r in rows if r["method"] == "icot-kd" and "digit_accuracy" in r), None)
    digits = len(ceiling["digit_accuracy"])
    out = [f"ICoT-KD stage by stage ({ceiling['n']} test lines; digit k of the answer, k = 0 first):", "",
           "| model | exact match | " + " | ".join(f"k={k}" for k in range(digits)) + " |",
           "| --- | --- |" + " --- |" * digits,
           _digits_row("student on the teacher's states (ceiling)", ceiling["accuracy"], ceiling["digit_accuracy"]),
           _digits_row("emulator -> student, before coupling", pair["accuracy"], pair["digit_accuracy"])]
    if coupled:
        out.append(_digits_row("coupled (icot-kd)", coupled["accuracy"], coupled["digit_accuracy"]))
    r2 = kd["emulator_r2"]
    out += ["", "Emulator: R² of its predicted states against the teacher's, per layer (1 = perfect; '-' = the "
                "teacher's state there is the same for every line):", "",
            "| " + " | ".join(f"l={l}" for l in range(len(r2))) + " |", "|" + " --- |" * len(r2),
            "| " + " | ".join("-" if v is None else f"{v:.3f}" for v in r2) + " |"]
    return out


def _probe_table(probes: dict[str, dict[str, Any]]) -> list[str]:
    """Best-layer R² of ``ĉ_k`` and CoT-digit accuracy per answer digit, one row per method, chance last."""
    first = next(iter(probes.values()))
    digits = len(first["r2"])

    def cell(r2: float, cot: float | None) -> str:
        return f"{r2:.2f}" + ("" if cot is None else f" / {100 * cot:.0f}%")

    out = [f"Linear probes (`probes/*.json`, heatmaps `probes/*.png`; fitted on {first['train']} training lines, "
           f"scored on {first['test']} test lines): per answer digit k, the best layer's R² of the running sum ĉ_k "
           "/ accuracy on the teacher's CoT digits of column k:", "",
           "| method | " + " | ".join(f"k={k}" for k in range(digits)) + " |", "| --- |" + " --- |" * digits]
    for method, p in probes.items():
        cots = p["cot"] or [None] * digits
        out.append(f"| {method} | " + " | ".join(cell(r, c) for r, c in zip(p["r2"], cots)) + " |")
    chance = first.get("cot_chance")
    if chance:
        out.append("| chance (CoT) | " + " | ".join("-" if c is None else f"{100 * c:.0f}%" for c in chance) + " |")
    return out


def save_figure(fig, path: str | Path) -> None:
    """Write a figure as PNG and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_by_size(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Exact match against operand size, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["size"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    # Methods often score the same (0% off the trained size): distinct markers and dashes keep every line visible.
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("x", "--")]
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        by = {r["size"]: r for r in rows if r["method"] == method}
        marker, line = styles[i % len(styles)]
        ax.plot(range(len(sizes)), [100 * by[z]["accuracy"] if "accuracy" in by.get(z, {}) else float("nan")
                                    for z in sizes], marker=marker, linestyle=line, markerfacecolor="none",
                label=method)
    ax.set_xticks(range(len(sizes)), sizes)
    ax.set_xlabel("operand digits (N x M)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_ylim(-5, 105)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    save_figure(fig, path)


def task_title(results: dict[str, Any]) -> str:
    """What the run solved, for plot titles: ``4x4 multiplication`` for generated data, else the test
    file's folder (``mult/5x5``-style paths) or, for a folder as generic as ``data``, the file name."""
    generate = (results.get("config") or {}).get("data", {}).get("generate")
    if generate:
        return f"{generate['digits']}x{generate.get('digits_b') or generate['digits']} multiplication"
    test = Path(results["test"])
    return test.parent.name if test.parent.name not in ("", ".", "data") else test.stem


def results_markdown(results: dict[str, Any]) -> str:
    """The paper-shaped table: method, accuracy, examples/s, speed relative to no-CoT at the same batch size."""
    rows = results["rows"]
    base = {r["batch_size"]: r["examples_per_second"] for r in rows if r["method"].startswith("no-cot")}
    lines = [f"Test file: `{results['test']}` (n = {rows[0]['n'] if rows else 0}); seed {results['seed']}; "
             f"commit `{results['commit'][:12]}`; {results['machine']['cpu_count']} CPU cores, "
             f"device {results['machine']['device']}"
             f"{_dtype_note(results['machine'].get('dtype', 'float32'))}.", "",
             "| method | accuracy | examples/s | batch size | speed vs no-CoT |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        # '-' where no no-CoT row was scored at this batch size
        ratio = f"{r['examples_per_second'] / base[r['batch_size']]:.2f}x" if r["batch_size"] in base else "-"
        lines.append(f"| {r['method']} | {100 * r['accuracy']:.1f}% | {r['examples_per_second']:.1f} | "
                     f"{r['batch_size']} | {ratio} |")
    lines += ["", "| stage | wall time (min) | optimizer steps | training examples | stopped by | kept model (validation) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, s in results["stages"].items():
        skipped = " (reused)" if s.get("skipped") else ""
        lines.append(f"| {name}{skipped} | {(s.get('seconds') or 0) / 60:.1f} | {s.get('steps')} | {s.get('examples')} | "
                     f"{s.get('stopped_by', '-')} | {_kept(s.get('best') or {})} |")
    if results.get("by_size"):
        lines += ["", *_by_size_table(results["by_size"])]
    if results.get("kd_stages"):
        lines += ["", *_kd_table(results["kd_stages"], rows)]
    if results.get("probes"):
        lines += ["", *_probe_table(results["probes"])]
    if "compute_seconds" in results:  # results written before these fields existed lack them
        stage_seconds = results["compute_seconds"] - results["eval_seconds"]
        lines += ["", f"Time: stages {stage_seconds / 60:.1f} min + evaluation {results['eval_seconds'] / 60:.1f} min "
                      f"= {results['compute_seconds'] / 60:.1f} min; this invocation's wall time "
                      f"{results['wall_seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy against examples/s (log scale), one point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(8, 4))
    markers = "os^Dv<>p*h"
    # A legend, not annotations: rows often share a point (several methods at 0%).
    for i, r in enumerate(results["rows"]):
        ax.scatter(r["examples_per_second"], 100 * r["accuracy"], s=50, marker=markers[i % len(markers)],
                   label=f"{r['method']} (bs {r['batch_size']})", alpha=0.8)
    ax.set_xscale("log")
    # Plain numbers, and minor labels only at 2x and 5x: a range under two decades otherwise labels every
    # minor tick as "3x10^1" and the labels overlap.
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(
        lambda x, _: f"{x:g}" if x > 0 and round(x / 10 ** math.floor(math.log10(x))) in (2, 5) else ""))
    ax.set_xlabel("examples / second")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_ylim(-5, 105)
    ax.set_title(f"{task_title(results)}: accuracy against speed")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    save_figure(fig, path)


def digit_curves(results: dict[str, Any]) -> dict[str, list[float]]:
    """Per-digit accuracy by model: each method at ``eval.batch_size`` (the batched rows decode the same answers),
    then ICoT-KD's student ceiling and uncoupled pair when measured."""
    batch_size = (results.get("config") or {}).get("eval", {}).get("batch_size")
    first = {}
    for r in results["rows"]:
        if "digit_accuracy" in r and (batch_size is None or r["batch_size"] == batch_size):
            first.setdefault(r["method"], r["digit_accuracy"])
    kd = results.get("kd_stages") or {}
    if "student_with_teacher_states" in kd:
        first["student on teacher states"] = kd["student_with_teacher_states"]["digit_accuracy"]
        first["emulator -> student (uncoupled)"] = kd["emulator_then_student"]["digit_accuracy"]
    return first


def plot_digits(curves: dict[str, list[float]], path: Path, title: str) -> None:
    """Accuracy of each answer digit (least significant first), one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(8, 4))
    markers = "os^Dv<>p*h"
    for i, (name, digits) in enumerate(curves.items()):
        ax.plot(range(len(digits)), [100 * d for d in digits], marker=markers[i % len(markers)], label=name)
    width = max(len(d) for d in curves.values())
    ax.set_xticks(range(width))
    ax.set_xlabel("answer digit k (0 = least significant)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-5, 105)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    ax.set_title(title)
    save_figure(fig, path)


def validations(metrics_path: str | Path) -> list[dict[str, Any]]:
    """The validation records of a stage's metrics.jsonl, in order."""
    lines = Path(metrics_path).read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "validate"]


def stepwise_validations(metrics_path: str | Path) -> list[dict[str, Any]]:
    """The validation records of a stepwise stage's metrics.jsonl (those that say the CoT removed), in order."""
    return [r for r in validations(metrics_path) if "val_cot_removed" in r]


def plot_stepwise(curves: dict[str, str | Path], path: Path, title: str = "ICoT-SI") -> None:
    """Validation exact match (solid) and token accuracy (dotted) of stepwise runs, against CoT tokens
    removed (left) and training examples seen (right); ``curves`` maps a label to a metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, (by_removed, by_examples) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for i, (label, metrics) in enumerate(curves.items()):
        vals = stepwise_validations(metrics)
        color = f"C{i % 10}"
        for ax, x in ((by_removed, [v["val_cot_removed"] for v in vals]), (by_examples, [v["examples"] for v in vals])):
            ax.plot(x, [100 * v["val_accuracy"] for v in vals], "-", color=color, label=f"{label}: exact match")
            ax.plot(x, [100 * v["val_token_accuracy"] for v in vals], ":", color=color, label=f"{label}: token accuracy")
    by_removed.set_xlabel("CoT tokens removed (schedule)")
    by_examples.set_xlabel("training examples seen")
    # 800000 -> 800k, 1500000 -> 1.5M, at most 6 ticks: labels that do not run into each other
    by_examples.xaxis.set_major_locator(MaxNLocator(6))
    by_examples.xaxis.set_major_formatter(lambda x, _: f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1000:g}k" if x else "0")
    by_removed.set_ylabel("validation accuracy (%), format of that step")
    for ax in (by_removed, by_examples):
        ax.set_ylim(-5, 105)
        ax.grid(True, alpha=0.3)
    by_examples.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def run_pipeline(config: IcotConfig, run_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the whole pipeline into ``run_dir`` and write its results; returns the results dict."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    state = process_state()  # under accelerate launch: the main process writes data and results
    with state.main_process_first():
        config = generate_data(config, run_dir)
    if not config.data.test:
        raise ConfigError("field 'data.test' is empty: the pipeline evaluates on a test file")
    check_data(config)
    stage_report = run_stages(config, run_dir, progress)
    if not state.is_main_process:
        return {}
    eval_start = time.monotonic()
    rows, by_size, probes = evaluate_methods(config, run_dir, progress)
    kd = kd_stages(config, run_dir, progress) if "icot-kd" in config.methods else {}
    eval_seconds = time.monotonic() - eval_start
    # wall_seconds is this invocation only; a resumed or partly reused run's cost is its stages' own
    # seconds (kept across resumes in each stage's checkpoint) plus this evaluation.
    compute_seconds = sum(s.get("seconds") or 0 for s in stage_report.values()) + eval_seconds
    results = {"rows": rows, "stages": stage_report, "test": config.data.test, "seed": config.teacher.seed,
               "commit": _commit(), "machine": machine(config.eval.device, config.eval.dtype),
               "wall_seconds": time.monotonic() - start, "eval_seconds": eval_seconds,
               "compute_seconds": compute_seconds, "config": config.to_dict(), "by_size": by_size,
               "probes": probes, "kd_stages": kd}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (run_dir / "results.md").write_text(results_markdown(results), encoding="utf-8")
    plot(results, run_dir / "accuracy_vs_speed.png")
    digits = digit_curves(results)
    if digits and max(map(len, digits.values())) > 1:  # one-token answers (GSM8K numbers) have no digits to compare
        plot_digits(digits, run_dir / "accuracy_by_digit.png", f"{task_title(results)}: accuracy per answer digit")
    if by_size:
        plot_by_size(by_size, run_dir / "accuracy_by_size.png", f"{task_title(results)}: exact match by operand size")
    if "stepwise" in stage_report:
        plot_stepwise({"icot-si": run_dir / stages.spec("stepwise").directory / "metrics.jsonl"}, run_dir / "stepwise_curve.png",
                      f"ICoT-SI, {task_title(results)}")
    print(results_markdown(results))
    return results
