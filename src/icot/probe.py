"""What implicit reasoning computes: linear probes of the multiplication's running sums in hidden states.

For ``a * b`` (digits least significant first) the k-th answer digit is ``c_k = ĉ_k mod 10`` with the
running sum ``ĉ_k = s_k + r_{k-1}``, ``s_k = sum_{i+j=k} a_i b_j`` and the carry ``r_k = floor(ĉ_k / 10)``
(METHOD.md, "From scratch"). Bai et al. decode ``ĉ_k`` linearly from an ICoT model's states and not from a
no-CoT model's. :func:`probe_model` fits, for every layer ``l`` and answer digit ``k``, a closed-form ridge
regression from the hidden state entering block ``l`` (``output_hidden_states[l]``; ``l = L`` is the output
after the final layer norm) at the position that predicts digit ``k`` to ``ĉ_k``, on training lines, and scores its R² on
held-out lines (1: read perfectly; 0: no better than the mean).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from icot.data import Example
from icot.data.multiplication import parse_input
from icot.errors import DataFormatError
from icot.evaluation import LMPredictor
from icot.generation import pad_right, shifted_positions
from icot.tokenizer import Encoded


def running_sums(a: int, b: int, digits_a: int, digits_b: int) -> list[int]:
    """``[ĉ_0, ..., ĉ_{N+M-1}]`` of ``a * b`` (one per answer digit, least significant first)."""
    da = [(a // 10**i) % 10 for i in range(digits_a)]
    db = [(b // 10**j) % 10 for j in range(digits_b)]
    sums, carry = [], 0
    for k in range(digits_a + digits_b):
        total = sum(da[i] * db[k - i] for i in range(digits_a) if 0 <= k - i < digits_b) + carry
        sums.append(total)
        carry = total // 10
    return sums


def problem_size(examples: Sequence[Example], path: str | None = None) -> tuple[int, int]:
    """The operand digits ``(N, M)`` shared by every example.

    Raises:
        DataFormatError: naming ``path`` and the line of the first non-multiplication or other-size problem.
    """
    size = None
    for line, ex in enumerate(examples, start=1):
        try:
            _, _, n, m = parse_input(ex.input)
        except DataFormatError as e:
            raise DataFormatError(e.problem, path, line) from None
        if size is not None and (n, m) != size:
            raise DataFormatError(f"a {n}x{m} problem among {size[0]}x{size[1]} ones: the probe needs one size",
                                  path, line)
        size = (n, m)
    if size is None:
        raise DataFormatError("no problems to probe", path)
    return size


def targets(examples: Sequence[Example]) -> torch.Tensor:
    """(N, K) running sums of multiplication examples of one size (see :func:`problem_size`)."""
    return torch.tensor([running_sums(*parse_input(ex.input)) for ex in examples], dtype=torch.float64)


@torch.no_grad()
def answer_states(predictor: LMPredictor, items: Sequence[Encoded], digits: int, batch_size: int = 256
                  ) -> torch.Tensor:
    """(N, L+1, K, H): the hidden states at the positions that predict the ``digits`` answer digits.

    Rows are fed teacher-forced in the layout the model was trained on (``items``), with its
    ``position_shift`` (a keep_position model's) applied from the first ``<sep>`` on.
    """
    model, pad = predictor.model, predictor.layout.pad_id
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        ids, mask = pad_right([it.ids for it in chunk], pad)  # (B, T)
        width = ids.shape[1]
        s1 = torch.tensor([it.s1 for it in chunk])
        positions = shifted_positions(width, s1, predictor.position_shift) if predictor.position_shift else None
        hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                       position_ids=None if positions is None else positions.to(device)).hidden_states
        # The state at answer_start - 1 + k predicts digit k.
        at = torch.tensor([[it.answer_start - 1 + k for k in range(digits)] for it in chunk], device=device)  # (B, K)
        rows = torch.arange(len(chunk), device=device)[:, None]
        out.append(torch.stack([h[rows, at] for h in hidden], dim=1).float().cpu())  # (B, L+1, K, H)
    return torch.cat(out)


def ridge_r2(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
             ridge: float = 1.0) -> float:
    """R² on the test rows of the closed-form ridge regression ``y ~ x w + c`` fitted on the train rows.

    Features are standardized with the training rows' statistics, so ``ridge`` means the same for every layer.
    """
    x_train, x_test = x_train.double(), x_test.double()
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-8)
    a, t = (x_train - mean) / std, (x_test - mean) / std
    y_mean = y_train.mean()
    eye = torch.eye(a.shape[1], dtype=a.dtype)
    w = torch.linalg.solve(a.T @ a + ridge * eye, a.T @ (y_train - y_mean))
    residual = ((t @ w + y_mean - y_test) ** 2).sum()
    total = ((y_test - y_test.mean()) ** 2).sum().clamp_min(1e-12)
    return float(1 - residual / total)


def probe_model(predictor: LMPredictor, train: Sequence[Example], test: Sequence[Example], ridge: float = 1.0,
                train_path: str | None = None, test_path: str | None = None) -> dict:
    """R² of ``ĉ_k`` per layer and answer digit.

    Returns:
        ``{"r2": [[R² for k] for l in 0..L], "layers": L + 1, "digits": K, "size": "NxM", "train": lines,
        "test": lines, "ridge": ridge}``.

    Raises:
        DataFormatError: naming the file and line of a problem that is not ``NxM`` multiplication of the
            training size, or a file with fewer than 2 problems.
    """
    size, test_size = problem_size(train, train_path), problem_size(test, test_path)
    if test_size != size:
        raise DataFormatError(f"the test problems are {test_size[0]}x{test_size[1]}, the training ones "
                              f"{size[0]}x{size[1]}: the probe needs one size", test_path)
    for examples, path in ((train, train_path), (test, test_path)):
        if len(examples) < 2:
            raise DataFormatError(f"{len(examples)} problem(s): the probe needs at least 2", path)
    y_train, y_test = targets(train), targets(test)
    digits = y_train.shape[1]
    layout = predictor.layout
    x_train = answer_states(predictor, layout.encode_all(train, predictor.with_cot, train_path), digits)
    x_test = answer_states(predictor, layout.encode_all(test, predictor.with_cot, test_path), digits)
    r2 = [[ridge_r2(x_train[:, l, k], y_train[:, k], x_test[:, l, k], y_test[:, k], ridge) for k in range(digits)]
          for l in range(x_train.shape[1])]
    return {"r2": r2, "layers": x_train.shape[1], "digits": digits, "size": f"{size[0]}x{size[1]}",
            "train": len(train), "test": len(test), "ridge": ridge}


def plot_r2(result: dict, path: str, title: str) -> None:
    """Heatmap of R² (layers x answer digits)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r2 = torch.tensor(result["r2"]).clamp(min=0)  # (L+1, K); below 0 is "no better than the mean"
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * r2.shape[1], 1.0 + 0.45 * r2.shape[0]))
    image = ax.imshow(r2.numpy(), vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
    for (l, k), value in zip(torch.cartesian_prod(torch.arange(r2.shape[0]), torch.arange(r2.shape[1])).tolist(),
                             r2.flatten().tolist()):
        ax.text(k, l, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w" if value < 0.6 else "k")
    ax.set_xlabel("answer digit k (least significant first)")
    ax.set_ylabel("layer (0: embeddings, L: output)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="R² of ĉ_k (held out)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
