"""How much of the answer do the teacher states hold? A probe per answer digit.

ICoT-KD's student (and hence the coupled model) only sees the L vectors ``z`` the teacher leaves at
its diagonal (METHOD.md, step 1). This fits, for each answer token position, a softmax regression
(or, with ``--hidden``, one shared ReLU layer and a softmax head per token) from the concatenated ``z``
(L*H features) to that token, on training lines, and scores it on a test file. The ``first_column``
subset reads the teacher at ``s1`` only, before any CoT token: it is the no-CoT control. A digit the
diagonal's probe reads far better than the control's is handed to the student; a digit neither reads
is one the student must compute itself, as a no-CoT model would.

    python benchmarks/probe_teacher_states.py --teacher runs/t4/teacher3 \
        --train runs/mult-4x4/data/train.txt --test ../shared/data/mult/4x4/valid.txt \
        --out results/mult-4x4/probe_teacher_states.json --subsets diagonal first_column --hidden 0 256
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from icot.config import KDConfig
from icot.data import read_examples
from icot.evaluation import write_json
from icot.tokenizer import Layout
from icot.training.distill import FrozenTeacher, paired_batch, paired_items


@torch.no_grad()
def states_and_answers(teacher: FrozenTeacher, layout: Layout, path: str, limit: int, batch_size: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher states (N, L*H) and answer token ids (N, A) of the first ``limit`` lines of ``path``."""
    examples = read_examples(path, allow_empty_cot=False)[:limit]
    items = paired_items(layout, examples, path)
    lengths = {len(it.nocot.ids) - it.nocot.answer_start for it in items}
    if len(lengths) != 1:
        raise ValueError(f"{path}: answers have different lengths {sorted(lengths)}; the probe needs one length")
    feats, answers = [], []
    for i in tqdm(range(0, len(items), batch_size), desc=f"states {Path(path).name}"):
        chunk = items[i:i + batch_size]
        z, _ = teacher.states(paired_batch(chunk, layout.pad_id))  # (B, L, H)
        feats.append(z.flatten(1))
        answers.append(torch.tensor([it.nocot.ids[it.nocot.answer_start:] for it in chunk]))  # (B, A) incl. <eos>
    return torch.cat(feats), torch.cat(answers)[:, :-1]  # drop <eos>


def fit_probe(x: torch.Tensor, y: torch.Tensor, vocab: int, steps: int, seed: int, hidden: int = 0) -> nn.Module:
    """A probe ``x (N, F) -> y (N, A)``, one softmax per answer token, fitted by full-batch Adam.

    ``hidden = 0`` is a softmax regression per token (the heads share nothing); ``hidden > 0`` puts one
    shared ReLU layer of that width in front of the heads (a stronger reader, closer to the student's MLPs).
    """
    torch.manual_seed(seed)
    n_tokens = y.shape[1]
    head_in = hidden or x.shape[1]
    trunk = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU()) if hidden else nn.Identity()
    probe = nn.Sequential(trunk, nn.Linear(head_in, n_tokens * vocab), nn.Unflatten(1, (n_tokens, vocab)))
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2 if not hidden else 3e-3)
    for _ in range(steps):
        opt.zero_grad()
        # Summed over tokens: each head's gradient is its own token's cross-entropy.
        nn.functional.cross_entropy(probe(x).flatten(0, 1), y.flatten(), reduction="sum").div(len(x)).backward()
        opt.step()
    return probe


def probe_subset(teacher_dir: str, subset: str, args: argparse.Namespace) -> list[dict]:
    """Per-digit and whole-answer accuracy of probes (one per width in ``args.hidden``) on one subset."""
    teacher = FrozenTeacher(teacher_dir, KDConfig(subset=subset))
    layout = Layout(teacher.tokenizer)
    x_train, y_train = states_and_answers(teacher, layout, args.train, args.train_lines, args.batch_size)
    x_test, y_test = states_and_answers(teacher, layout, args.test, args.test_lines, args.batch_size)
    rows = []
    for hidden in args.hidden:
        probe = fit_probe(x_train, y_train, len(teacher.tokenizer), args.steps, seed=0, hidden=hidden)
        with torch.no_grad():
            per_digit = (probe(x_test).argmax(-1) == y_test).float()  # (N, A)
        rows.append({"subset": subset, "hidden": hidden,
                     "digit_accuracy": [round(v, 4) for v in per_digit.mean(0).tolist()],
                     "answer_accuracy": float(per_digit.prod(1).mean()), "train_lines": len(x_train),
                     "test_lines": len(x_test), "features": x_train.shape[1]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="teacher stage directory")
    ap.add_argument("--train", required=True, help="lines to fit the probes on")
    ap.add_argument("--test", required=True, help="lines to score them on")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--subsets", nargs="+", default=["diagonal", "first_column", "last_column", "top_row"])
    ap.add_argument("--train-lines", type=int, default=20000)
    ap.add_argument("--test-lines", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=300, help="Adam steps per probe")
    ap.add_argument("--hidden", type=int, nargs="+", default=[0, 256],
                    help="widths of the probes' ReLU layer, one probe each (0: linear)")
    ap.add_argument("--batch-size", type=int, default=500)
    args = ap.parse_args()
    start = time.monotonic()
    rows = [row for s in args.subsets for row in probe_subset(args.teacher, s, args)]
    report = {"teacher": args.teacher, "train": args.train, "test": args.test, "rows": rows,
              "seconds": round(time.monotonic() - start, 1)}
    write_json(report, args.out)
    for r in rows:
        print(f"{r['subset']:>13} hidden {r['hidden']:>4}: answer {r['answer_accuracy']:.1%}  digits "
              + " ".join(f"{a:.2f}" for a in r["digit_accuracy"]))


if __name__ == "__main__":
    main()
