"""ICoT-KD's ceiling on a test file: a mind-reading student answering with the teacher's states of each
line's reference CoT, as exact match and accuracy per answer digit (least significant first).

The pipeline reports the same number in results.md once the emulator exists (``icot.kd_quality``); this
scores a student alone, so a lever can be screened before an emulator is trained behind it. By default it
scores the stage's kept (best) model; ``--checkpoint`` scores the student weights of its latest training
checkpoint instead, which only a stage not yet finished holds (running, or stopped): useful where the
keep-best choice rests on a dev exact match too low to rank by.

    python benchmarks/kd_ceiling.py --teacher runs/kd/teacher --student runs/kd/student \\
        --test runs/kd/data/test.txt [--checkpoint]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from icot.config import KDConfig
from icot.data import read_examples
from icot.evaluation import evaluate
from icot.kd_quality import TeacherStatesPredictor
from icot.models.student import MindReadingStudent
from icot.rundir import META_FILE, checkpoint_dir, model_path, read_meta
from icot.training.distill import FrozenTeacher
from icot.training.resume import load_module_state
from icot.training.student import StudentWithTeacher


def latest_checkpoint(stage_dir: str) -> Path:
    """The training checkpoint of student stage ``stage_dir``, which must also hold a kept model (its shape)."""
    if read_meta(stage_dir)["kind"] != "stage":
        raise SystemExit(f"--checkpoint: {stage_dir} is a model directory; name the stage directory above it")
    path = checkpoint_dir(stage_dir)
    if path is None:
        raise SystemExit(f"--checkpoint: {stage_dir} holds no training checkpoint (a finished stage keeps none)")
    if not (model_path(stage_dir) / META_FILE).is_file():
        raise SystemExit(f"--checkpoint: {stage_dir} has no kept model yet, whose shape the checkpoint is read "
                         "into; it appears at the stage's first validation")
    return path


def load_student(checkpoint: Path, student: MindReadingStudent, teacher: FrozenTeacher, teacher_dir: str) -> None:
    """Load the checkpoint's student into ``student`` (in place); its teacher must be ``teacher``."""
    before = {k: t.clone() for k, t in teacher.state_dict().items()}
    # The checkpoint holds the whole training module: the student beside the frozen teacher.
    load_module_state(checkpoint, StudentWithTeacher(student, teacher))
    changed = next((k for k, t in teacher.state_dict().items() if not torch.equal(t, before[k])), None)
    if changed is not None:
        raise SystemExit(f"--checkpoint: {checkpoint} was trained against another teacher than {teacher_dir} "
                         f"(tensor {changed!r} differs)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="the teacher stage (or model) directory")
    ap.add_argument("--student", required=True, help="the student stage (or model) directory")
    ap.add_argument("--test", required=True, help="test file, INPUT||COT #### ANSWER per line")
    ap.add_argument("--subset", default="diagonal", help="the teacher states the student was trained on")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--checkpoint", action="store_true",
                    help="score the student of the stage's latest training checkpoint, not its kept model")
    args = ap.parse_args()
    checkpoint = latest_checkpoint(args.student) if args.checkpoint else None
    examples = read_examples(args.test)
    teacher = FrozenTeacher(str(model_path(args.teacher)), KDConfig(subset=args.subset))
    student, _ = MindReadingStudent.from_pretrained(model_path(args.student))
    if checkpoint is not None:
        load_student(checkpoint, student, teacher, args.teacher)
    student.eval()
    predictor = TeacherStatesPredictor(student, teacher, examples, args.test)
    result = evaluate(predictor, examples, batch_size=args.batch_size, progress=False, warmup=False)
    print(json.dumps({k: result[k] for k in ("accuracy", "digit_accuracy", "n")}))


if __name__ == "__main__":
    main()
