"""ICoT-KD's ceiling on a test file: a mind-reading student answering with the teacher's states of each
line's reference CoT, as exact match and accuracy per answer digit (least significant first).

The pipeline reports the same number in results.md once the emulator exists (``icot.kd_quality``); this
scores a student alone, so a lever can be screened before an emulator is trained behind it. By default it
scores the stage's kept (best) model; ``--checkpoint`` scores the weights of its latest training
checkpoint instead (a stage still running, or one whose keep-best choice rests on a dev exact match too
low to rank by).

    python benchmarks/kd_ceiling.py --teacher runs/kd/teacher --student runs/kd/student \\
        --test runs/kd/data/test.txt [--checkpoint]
"""

from __future__ import annotations

import argparse
import json

from icot.config import KDConfig
from icot.data import read_examples
from icot.evaluation import evaluate
from icot.kd_quality import TeacherStatesPredictor
from icot.models.student import MindReadingStudent
from icot.rundir import checkpoint_dir, model_path
from icot.training.distill import FrozenTeacher
from icot.training.resume import load_module_state
from icot.training.student import StudentWithTeacher


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
    examples = read_examples(args.test)
    teacher = FrozenTeacher(str(model_path(args.teacher)), KDConfig(subset=args.subset))
    student, _ = MindReadingStudent.from_pretrained(model_path(args.student))
    if args.checkpoint:
        path = checkpoint_dir(args.student)
        if path is None:
            raise SystemExit(f"--checkpoint: {args.student} holds no training checkpoint (a finished stage "
                             "keeps none)")
        # The checkpoint holds the whole training module: the student beside the frozen teacher.
        load_module_state(path, StudentWithTeacher(student, teacher))
    student.eval()
    predictor = TeacherStatesPredictor(student, teacher, examples, args.test)
    result = evaluate(predictor, examples, batch_size=args.batch_size, progress=False, warmup=False)
    print(json.dumps({k: result[k] for k in ("accuracy", "digit_accuracy", "n")}))


if __name__ == "__main__":
    main()
