"""Command line: ``icot data``, ``icot train``, ``icot eval``, ``icot predict``, ``icot probe``, ``icot export``,
``icot pipeline``.

Bad input (data, config, checkpoint) ends in one line on stderr naming the file, the line or field
and the problem, and exit status 2. Training stopped by SIGINT / SIGTERM saves a checkpoint, says so in
one line and exits with 130 / 143 (``icot train ... --resume`` continues it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from icot.errors import IcotInputError, TrainingInterrupted

STAGES = ("teacher", "nocot", "student", "emulator", "couple", "stepwise")  # icot.training.stages.ORDER (tested)
COUNT, SEED = 200, 12345  # icot eval --sizes: problems per size and their seed


def _data_mult(args: argparse.Namespace) -> None:
    from icot.data.multiplication import write_training_file

    try:
        stats = write_training_file(args.out, args.digits, args.digits_b or args.digits, args.count, args.seed,
                                    args.exclude or [])
    except IcotInputError:
        raise
    except ValueError as e:  # an impossible request (too many lines for the digit count, count < 1)
        raise IcotInputError(str(e)) from None
    print(json.dumps(stats))


def _data_gsm8k(args: argparse.Namespace) -> None:
    from pathlib import Path

    from icot.data.gsm8k import convert_original

    if Path(args.out).resolve() == Path(args.input).resolve():
        raise IcotInputError("--out is the --in file: the conversion would overwrite its source", args.out)
    report = convert_original(args.input, args.out, exclude_paths=args.exclude or [],
                              keep_unannotated=args.keep_unannotated)
    print(report.summary())


def _data_check(args: argparse.Namespace) -> int:
    """Print each bad line as ``FILE:LINE: problem`` and a count per file; 2 when any line is bad."""
    from icot.data.multiplication import check_file

    bad = 0
    for path in args.files:
        lines, problems = check_file(path)
        for problem in problems:
            print(problem)
        bad += len(problems)
        print(f"{path}: {lines} lines, {len(problems)} bad (malformed, not a multiplication, or a COT or ANSWER "
              "that does not follow from the INPUT)", file=sys.stderr)
    return 2 if bad else 0


def _train(args: argparse.Namespace, overrides: list[str]) -> None:
    from icot.config import load_config
    from icot.training import stages

    _check_out(args)
    config = load_config(args.config, overrides)
    result = stages.run(args.stage, config, args.out, resume=args.resume, teacher=args.teacher,
                        student=args.student, emulator=args.emulator)
    if _is_main_process():
        print(json.dumps(result, indent=2))


def _check_out(args: argparse.Namespace) -> None:
    """Refuse to train over a stage directory's work unless told how: ``--resume`` continues an unfinished
    run from its checkpoint, ``--overwrite`` replaces whatever is there."""
    from pathlib import Path

    from icot.rundir import can_resume, read_meta

    if args.resume and args.overwrite:
        raise IcotInputError("--resume and --overwrite exclude each other", args.out)
    out = Path(args.out)
    if args.resume or args.overwrite or not (out / "icot.json").is_file():
        return
    try:
        meta = read_meta(out)
    except IcotInputError:
        meta = {}
    what = f"a {meta.get('kind', 'model')} directory"
    if meta.get("kind") == "stage":
        if can_resume(out):
            what = f"an unfinished '{meta.get('stage')}' run with a checkpoint"
        else:
            what = f"a {meta.get('status', 'finished')} '{meta.get('stage')}' stage"
    raise IcotInputError(f"holds {what}: pass --resume to continue it or --overwrite to replace it", args.out)


def _is_main_process() -> bool:
    """False in the other processes of ``accelerate launch``, which print nothing."""
    from icot.devices import process_state

    return process_state().is_main_process


def _eval(args: argparse.Namespace) -> None:
    from icot.config import parse_sizes
    from icot.data import read_examples
    from icot.devices import decode_device
    from icot.evaluation import check_inputs, evaluate, evaluate_sizes, load_predictor, write_json

    sizes = None
    if args.sizes is not None:  # before loading a model: a typo fails at once
        try:
            sizes = parse_sizes(args.sizes)
        except IcotInputError as e:
            raise IcotInputError(f"--sizes: {e.problem}") from None
        if args.limit:
            raise IcotInputError("--limit applies to --data; with --sizes, --count sets the problems per size")
    elif args.count != COUNT or args.seed != SEED or args.exclude:
        raise IcotInputError("--count, --seed and --exclude apply to --sizes, not to --data")
    predictor = load_predictor(args.model, max_new_tokens=args.max_new_tokens, device=args.device,
                               dtype=args.dtype)
    head = {"model": args.model, "device": str(decode_device(args.device)), "dtype": args.dtype}
    if sizes is not None:
        rows = evaluate_sizes(predictor, sizes, args.count, args.seed, args.batch_size, args.exclude or [])
        result = {**head, "count": args.count, "seed": args.seed, "exclude": args.exclude or [], "by_size": rows}
        for row in rows:
            shown = f"{100 * row['accuracy']:.1f}% of {row['n']}" if "accuracy" in row else f"not scored: {row['error']}"
            print(f"{row['size']}: {shown}", file=sys.stderr)
    else:
        examples = read_examples(args.data, allow_empty_cot=True)
        check_inputs(predictor, [ex.input for ex in examples[: args.limit or None]], args.data)
        result = {**head, "data": args.data, **evaluate(predictor, examples, batch_size=args.batch_size, limit=args.limit)}
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(result, args.json)


def _predict(args: argparse.Namespace) -> None:
    from icot.evaluation import check_inputs, load_predictor

    empty = next((i for i, text in enumerate(args.inputs, start=1) if not text.strip()), None)
    if empty is not None:
        raise IcotInputError("the INPUT is empty", "<input>", empty)
    predictor = load_predictor(args.model, max_new_tokens=args.max_new_tokens, device=args.device,
                               dtype=args.dtype)
    check_inputs(predictor, args.inputs)
    for text, pred in zip(args.inputs, predictor.predict(args.inputs)):
        if pred.cot:
            print(f"cot: {pred.cot}")
        print(f"answer: {pred.answer}" if len(args.inputs) == 1 else f"{text} => {pred.answer}")


def _probe(args: argparse.Namespace) -> None:
    from icot.data import read_examples
    from icot.evaluation import load_predictor, write_json
    from icot.probe import plot_probe, probe_model

    predictor = load_predictor(args.model, device=args.device)
    # A teacher is probed teacher-forced on the reference CoT, which its test lines must then have; the other
    # models' test lines may lack it (then there is no CoT probe).
    train = read_examples(args.train)[: args.train_lines]
    test = read_examples(args.test, allow_empty_cot=not predictor.with_cot)[: args.test_lines]
    result = {"model": args.model, "train_file": args.train, "test_file": args.test,
              **probe_model(predictor, train, test, args.ridge, args.train, args.test)}
    write_json(result, args.json)
    for layer, row in enumerate(result["r2"]):
        print(f"layer {layer}: R² " + " ".join(f"{v:5.2f}" for v in row), file=sys.stderr)
    if result["cot"]:
        for layer, row in enumerate(result["cot"]["column_accuracy"]):
            print(f"layer {layer}: CoT " + " ".join("    -" if v is None else f"{v:5.2f}" for v in row), file=sys.stderr)
        print("chance:   CoT " + " ".join("    -" if v is None else f"{v:5.2f}" for v in result["cot"]["column_chance"]),
              file=sys.stderr)
    else:
        print(f"no CoT probe: {args.test} has lines without a CoT", file=sys.stderr)
    if args.plot:
        plot_probe(result, args.plot, f"{args.model}: what a linear probe reads")


def _export(args: argparse.Namespace) -> None:
    from icot.evaluation import export_model

    print(f"[icot] wrote {export_model(args.model, args.out, args.dtype)} ({args.dtype} weights)")


def _pipeline(args: argparse.Namespace, overrides: list[str]) -> None:
    from icot.config import load_config
    from icot.pipeline import run_pipeline

    config = load_config(args.config, overrides)
    run_pipeline(config, args.out)


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low``, refused with one line otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def _positive_float(text: str) -> float:
    """An argparse type: a finite number > 0, refused with one line otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _decode_flags(parser: argparse.ArgumentParser) -> None:
    from icot.config import EVAL_DTYPES

    parser.add_argument("--device", default="auto", help="where to decode: auto (a GPU when there is one), cpu, cuda, ...")
    parser.add_argument("--dtype", default="float32", choices=EVAL_DTYPES, help="the weights' dtype while decoding")


DESCRIPTION = """Train language models to answer multi-step problems without writing out a chain of thought
(implicit CoT): ICoT-KD (teacher -> mind-reading student + thought emulator -> couple) and ICoT-SI
(stepwise internalization), beside the no-CoT and explicit-CoT baselines. Data lines read
INPUT||COT #### ANSWER."""

OVERRIDES = """Any config field can be set on the command line as --SECTION.FIELD VALUE after the other
options (e.g. --teacher.lr 5e-4 --model.n_layer 4 --si.keep_position true); flags win over the YAML
file, and the resolved config is saved beside every checkpoint."""


def build_parser() -> argparse.ArgumentParser:
    """The ``icot`` argument parser."""
    parser = argparse.ArgumentParser(prog="icot", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="make or check data files").add_subparsers(dest="task", required=True)
    mult = data.add_parser("mult", help="generate multiplication examples in the papers' format")
    mult.add_argument("--digits", type=_int_at_least(1), required=True, help="digits of the first operand (N)")
    mult.add_argument("--digits-b", type=_int_at_least(0), default=0, help="digits of the second operand (M; default N)")
    mult.add_argument("--count", type=_int_at_least(1), required=True, help="number of lines (distinct inputs)")
    mult.add_argument("--seed", type=_int_at_least(0), default=0, help="random seed of the operand draw (default 0)")
    mult.add_argument("--out", required=True, help="file to write")
    mult.add_argument("--exclude", action="append", help="data file whose INPUTs must not appear (repeatable)")
    check = data.add_parser("check", help="list every multiplication line whose COT or ANSWER does not follow "
                                          "from its INPUT, as FILE:LINE (exit 2 when there is one)")
    check.add_argument("files", nargs="+", metavar="FILE", help="data file(s) in the INPUT||COT #### ANSWER format")
    gsm = data.add_parser("gsm8k", help="GSM8K with <<...>> annotations -> the equation-only CoT format")
    gsm.add_argument("--in", dest="input", required=True, help="GSM8K file with calculator annotations")
    gsm.add_argument("--out", required=True, help="file to write (not the --in file)")
    gsm.add_argument("--exclude", action="append",
                     help="data file whose INPUTs must not be written (repeatable); give the test file: the 500 "
                          "questions of shared/data/gsm8k/valid.txt are all in train_original.txt")
    gsm.add_argument("--keep-unannotated", action="store_true",
                     help="write solutions without <<...>> annotations with an empty COT (as valid.txt has) "
                          "instead of reporting and dropping them")

    train = sub.add_parser("train", help="train one stage", description="Train one stage into OUT. " + OVERRIDES)
    train.add_argument("stage", choices=STAGES, help="teacher (explicit CoT), nocot, student, emulator, couple "
                                                     "(ICoT-KD), or stepwise (ICoT-SI)")
    train.add_argument("--config", help="YAML config (default: the built-in defaults)")
    train.add_argument("--out", required=True, help="stage directory to write")
    train.add_argument("--teacher", default="", help="teacher stage directory (student, emulator; stepwise starts from it unless si.from_teacher is false)")
    train.add_argument("--student", default="", help="student stage directory (couple)")
    train.add_argument("--emulator", default="", help="emulator stage directory (couple)")
    train.add_argument("--resume", action="store_true",
                       help="continue from OUT/checkpoint (written every save_every steps and on SIGINT/SIGTERM); "
                            "only the stage's budget and reporting fields may change")
    train.add_argument("--overwrite", action="store_true",
                       help="replace what OUT holds (a finished stage, or a run with a checkpoint); without it "
                            "icot train refuses such an OUT")

    ev = sub.add_parser("eval", help="exact-match accuracy and examples/s")
    ev.add_argument("--model", required=True, help="model or stage directory")
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="data file (INPUT||COT #### ANSWER); the CoT is not shown to the model")
    what.add_argument("--sizes", help="instead of --data: generated multiplication problems of these operand sizes, "
                                      "e.g. 3x3,3x4,4x5 (out of distribution for a model trained on another size)")
    ev.add_argument("--count", type=_int_at_least(1), default=COUNT, help=f"problems per size (--sizes; default {COUNT})")
    ev.add_argument("--seed", type=_int_at_least(0), default=SEED, help="seed of the generated problems (--sizes)")
    ev.add_argument("--exclude", action="append",
                    help="data file whose INPUTs the generated problems avoid, e.g. the training file (--sizes; repeatable)")
    ev.add_argument("--batch-size", type=_int_at_least(1), default=1, help="examples decoded together (1: the papers')")
    ev.add_argument("--limit", type=_int_at_least(0), default=0, help="evaluate the first N lines (0: all)")
    ev.add_argument("--max-new-tokens", type=_int_at_least(1), default=256, help="decoding budget per example")
    ev.add_argument("--json", help="also write the result here")
    _decode_flags(ev)

    pr = sub.add_parser("predict", help="answer inputs")
    pr.add_argument("--model", required=True, help="model or stage directory")
    pr.add_argument("--max-new-tokens", type=_int_at_least(1), default=256, help="decoding budget per example")
    pr.add_argument("inputs", nargs="+", help="INPUT text, e.g. '9 1 7 3 * 9 4 3 3'")
    _decode_flags(pr)

    probe = sub.add_parser("probe", help="linear probes of the multiplication's running sums and the CoT digits in every layer")
    probe.add_argument("--model", required=True, help="teacher, no-CoT, stepwise or implicit model or stage directory")
    probe.add_argument("--train", required=True, help="multiplication lines to fit the probes on")
    probe.add_argument("--test", required=True, help="held-out multiplication lines to score them on")
    probe.add_argument("--train-lines", type=_int_at_least(2), default=4000, help="lines of --train used (default 4000)")
    probe.add_argument("--test-lines", type=_int_at_least(2), default=1000, help="lines of --test used (default 1000)")
    probe.add_argument("--ridge", type=_positive_float, default=1.0, help="ridge penalty on standardized features (> 0)")
    probe.add_argument("--json", required=True, help="where to write R² and CoT accuracy per layer and answer digit")
    probe.add_argument("--plot", help="also draw the heatmaps here (PNG)")
    probe.add_argument("--device", default="auto", help="where to run the model: auto, cpu, cuda, ...")

    ex = sub.add_parser("export", help="copy a model with its weights in another dtype (bf16 halves its size)")
    ex.add_argument("--model", required=True, help="model or stage directory (a stage's best model is exported)")
    ex.add_argument("--out", required=True, help="model directory to write (icot eval / predict read it)")
    ex.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                    help="the copy's weight dtype (default bfloat16)")

    pipe = sub.add_parser("pipeline", help="train the stages the config's methods need, then evaluate them",
                          description="Train what the config's methods (nocot, explicit, icot-kd, icot-si) need "
                                      "into OUT, evaluate every method on data.test, and write results.json, "
                                      "results.md and plots. A stage already done with the same config is skipped "
                                      "and an interrupted one resumes from its checkpoint: run the same command "
                                      "again. " + OVERRIDES)
    pipe.add_argument("config", help="YAML config")
    pipe.add_argument("--out", required=True, help="run directory")
    pipe.add_argument("--resume", action="store_true",
                      help="accepted for symmetry with icot train; the pipeline always resumes what it can")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``icot`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "pipeline"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    completed = False
    try:
        if args.command == "data" and args.task == "check":
            return _data_check(args)
        if args.command == "data":
            _data_mult(args) if args.task == "mult" else _data_gsm8k(args)
        elif args.command == "train":
            _train(args, extra)
        elif args.command == "eval":
            _eval(args)
        elif args.command == "predict":
            _predict(args)
        elif args.command == "probe":
            _probe(args)
        elif args.command == "export":
            _export(args)
        else:
            _pipeline(args, extra)
        completed = True
    except (IcotInputError, OSError) as e:  # OSError: a missing, unreadable or unwritable path
        print(f"icot: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"icot: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        _end_processes(completed)
    return 0


def _end_processes(completed: bool) -> None:
    """End the process group of an ``accelerate launch`` run (only training forms one, and imports torch)."""
    if "torch" in sys.modules:
        from icot.training.distributed import end_process_group

        end_process_group(completed)


if __name__ == "__main__":
    sys.exit(main())
