"""ICoT-KD's ceiling on a test file: a mind-reading student answering with the teacher's states of each
line's reference CoT, as exact match and accuracy per answer digit (least significant first).

The pipeline reports the same number in results.md once the emulator exists (``icot.kd_quality``); this
scores a student alone, so a lever can be screened before an emulator is trained behind it.

    python benchmarks/kd_ceiling.py --teacher runs/kd/teacher --student runs/kd/student \\
        --test runs/kd/data/test.txt
"""

from __future__ import annotations

import argparse
import json

from icot.config import KDConfig
from icot.data import read_examples
from icot.evaluation import evaluate
from icot.kd_quality import TeacherStatesPredictor
from icot.models.student import MindReadingStudent
from icot.rundir import model_path
from icot.training.distill import FrozenTeacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="the teacher stage (or model) directory")
    ap.add_argument("--student", required=True, help="the student stage (or model) directory")
    ap.add_argument("--test", required=True, help="test file, INPUT||COT #### ANSWER per line")
    ap.add_argument("--subset", default="diagonal", help="the teacher states the student was trained on")
    ap.add_argument("--batch-size", type=int, default=250)
    args = ap.parse_args()
    examples = read_examples(args.test)
    teacher = FrozenTeacher(str(model_path(args.teacher)), KDConfig(subset=args.subset))
    student, _ = MindReadingStudent.from_pretrained(model_path(args.student))
    student.eval()
    predictor = TeacherStatesPredictor(student, teacher, examples, args.test)
    result = evaluate(predictor, examples, batch_size=args.batch_size, progress=False, warmup=False)
    print(json.dumps({k: result[k] for k in ("accuracy", "digit_accuracy", "n")}))


if __name__ == "__main__":
    main()
