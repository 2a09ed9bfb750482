"""What implicit reasoning computes: linear probes of the multiplication's running sums in hidden states.

For ``a * b`` (digits least significant first) the k-th answer digit is ``c_k = ĉ_k mod 10`` with the
running sum ``ĉ_k = s_k + r_{k-1}``, ``s_k = sum_{i+j=k} a_i b_j`` and the carry ``r_k = floor(ĉ_k / 10)``
(METHOD.md, "From scratch"). Bai et al. decode ``ĉ_k`` linearly from an ICoT model's states and not from a
no-CoT model's. :func:`probe_model` fits, for every layer ``l`` and answer digit ``k``, a closed-form ridge
regression from the hidden state entering block ``l`` (``output_hidden_states[l]``; ``l = L`` is the output
after the final layer norm) at the position that predicts digit ``k`` to ``ĉ_k``, on training lines, and scores its R² on
held-out lines (1: read perfectly; 0: no better than the mean).

From the same states it decodes the teacher's CoT (:func:`cot_probe`): for every layer ``l``, answer digit ``k``
and CoT symbol ``j`` whose value varies across the training lines (the digits of the partial products ``P_i``
and running sums ``S_i``; the operators and the constant zero padding are left out), a closed-form linear
classifier (ridge regression onto one-hot symbols, prediction = argmax) fitted on the training lines' reference
CoT and scored as accuracy on the held-out lines, beside the chance level (the training lines' most frequent
symbol at ``j``). Every ``(l, k, j)`` is kept; the summary pairs answer digit ``k`` with the CoT digits of the
same column (place ``10^k``) of every ``P_i`` and ``S_i``: does the state that writes digit ``k`` hold the
intermediate digits the CoT computes for it?

The implicit (ICoT-KD) model's states are its student's during the forward pass on the emulated states
(:meth:`~icot.models.implicit.ImplicitModel.hidden_states`), at the answer positions of its own layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from icot.data import Example
from icot.data.multiplication import parse_input
from icot.errors import DataFormatError
from icot.evaluation import ImplicitPredictor, LMPredictor
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


def cot_columns(cot: str) -> list[tuple[str, int] | None]:
    """Per CoT symbol: ``(group, column)`` for a digit (``("P1", 2)``: digit ``10^2`` of partial product 1,
    ``("S1", 0)``: digit ``10^0`` of running sum 1), None for ``+``, ``(`` and ``)``."""
    out: list[tuple[str, int] | None] = []
    group, part, column = 0, "P", 0
    for symbol in cot.split():
        if symbol == "+":
            group, part, column = group + 1, "P", 0
        elif symbol == "(":
            part, column = "S", 0
        if symbol in ("+", "(", ")"):
            out.append(None)
        else:
            out.append((f"{part}{group}", column))
            column += 1
    return out


def cot_symbols(examples: Sequence[Example], path: str | None = None) -> list[list[str]]:
    """The CoT symbols of every example, which must all have the same number.

    Raises:
        DataFormatError: naming ``path`` and the line of the first CoT of another length (or none).
    """
    rows = [ex.cot.split() for ex in examples]
    for line, row in enumerate(rows, start=1):
        if len(row) != len(rows[0]) or not row:
            raise DataFormatError(f"a CoT of {len(row)} symbols among ones of {len(rows[0])}: the CoT probe needs "
                                  "one layout", path, line)
    return rows


def targets(examples: Sequence[Example]) -> torch.Tensor:
    """(N, K) running sums of multiplication examples of one size (see :func:`problem_size`)."""
    return torch.tensor([running_sums(*parse_input(ex.input)) for ex in examples], dtype=torch.float64)


Probed = LMPredictor | ImplicitPredictor  # the models icot probe reads


def layer_states(predictor: Probed, ids: torch.Tensor, mask: torch.Tensor, s1: torch.Tensor
                 ) -> Sequence[torch.Tensor]:
    """``L + 1`` hidden states (B, T, H) of a right-padded batch: ``output_hidden_states`` of a causal LM (with a
    keep_position model's ``position_shift`` applied from ``s1`` on), the student's block inputs of an implicit model."""
    if isinstance(predictor, ImplicitPredictor):
        return predictor.model.hidden_states(ids, mask, s1)
    positions = shifted_positions(ids.shape[1], s1, predictor.position_shift) if predictor.position_shift else None
    return predictor.model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                           position_ids=None if positions is None else positions.to(ids.device)).hidden_states


@torch.no_grad()
def answer_states(predictor: Probed, items: Sequence[Encoded], digits: int, batch_size: int = 256
                  ) -> torch.Tensor:
    """(N, L+1, K, H): the hidden states at the positions that predict the ``digits`` answer digits.

    Rows are fed teacher-forced in the layout the model was trained on (``items``; an implicit model's
    ``INPUT <sep> [MARKER] ANSWER <eos>``, through its emulator and student: :func:`layer_states`).
    """
    device = next(predictor.model.parameters()).device
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        ids, mask = pad_right([it.ids for it in chunk], predictor.layout.pad_id)  # (B, T)
        s1 = torch.tensor([it.s1 for it in chunk])  # (B,)
        hidden = layer_states(predictor, ids.to(device), mask.to(device), s1.to(device))  # L+1 x (B, T, H)
        # The state at answer_start - 1 + k predicts digit k.
        start = torch.tensor([it.answer_start - 1 for it in chunk], device=device)  # (B,)
        at = start[:, None] + torch.arange(digits, device=device)[None, :]  # (B, K)
        rows = torch.arange(len(chunk), device=device)[:, None]  # (B, 1)
        out.append(torch.stack([h[rows, at] for h in hidden], dim=1).float().cpu())  # (B, L+1, K, H)
    return torch.cat(out)


def standardize(x_train: torch.Tensor, x_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both (..., N, H) in float64, centred and scaled by the training rows' statistics (over N)."""
    x_train, x_test = x_train.double(), x_test.double()
    mean, std = x_train.mean(-2, keepdim=True), x_train.std(-2, keepdim=True).clamp_min(1e-8)  # (..., 1, H)
    return (x_train - mean) / std, (x_test - mean) / std


def ridge_fit(a: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """(..., H, D) weights ``w`` minimizing ``||a w - y||² + ridge ||w||²`` for centred ``y`` (..., N, D)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    return torch.linalg.solve(a.transpose(-1, -2) @ a + ridge * eye, a.transpose(-1, -2) @ y)


def ridge_r2(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
             ridge: float = 1.0) -> float:
    """R² on the test rows of the closed-form ridge regression ``y ~ x w + c`` fitted on the train rows.

    Features are standardized with the training rows' statistics, so ``ridge`` means the same for every layer.
    """
    a, t = standardize(x_train, x_test)  # (N, H), (N', H)
    y_mean = y_train.mean()
    w = ridge_fit(a, (y_train - y_mean)[:, None], ridge)[:, 0]  # (H,)
    residual = ((t @ w + y_mean - y_test) ** 2).sum()
    total = ((y_test - y_test.mean()) ** 2).sum().clamp_min(1e-12)
    return float(1 - residual / total)


def ridge_classify(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, classes: int,
                   ridge: float = 1.0) -> torch.Tensor:
    """Closed-form linear classifiers: ridge regression onto one-hot targets, prediction = argmax.

    Args:
        x_train: (P, N, H) features of P independent problems (e.g. the K answer digits of one layer).
        y_train: (N, J) long class ids in ``[0, classes)``: J targets, each decoded by its own classifier.
        x_test: (P, N', H).
        classes: V.

    Returns:
        (P, N', J) predicted class ids (a class never seen at ``j`` in training is never predicted).
    """
    a, t = standardize(x_train, x_test)  # (P, N, H), (P, N', H)
    onehot = torch.nn.functional.one_hot(y_train, classes).double().flatten(1)  # (N, J*V)
    mean = onehot.mean(0)  # (J*V,)
    w = ridge_fit(a, (onehot - mean).expand(a.shape[0], -1, -1), ridge)  # (P, H, J*V)
    scores = t @ w + mean  # (P, N', J*V)
    return scores.unflatten(-1, (y_train.shape[1], classes)).argmax(-1)  # (P, N', J)


def cot_probe(x_train: torch.Tensor, x_test: torch.Tensor, train: Sequence[Example], test: Sequence[Example],
              ridge: float = 1.0, train_path: str | None = None, test_path: str | None = None) -> dict:
    """Accuracy of decoding the teacher's CoT digits from every layer and answer-digit state.

    Args:
        x_train: (N, L+1, K, H) :func:`answer_states` of the training lines.
        x_test: (N', L+1, K, H) those of the held-out lines.
        train, test: the lines; their reference CoT is the teacher's (one layout: :func:`cot_symbols`).

    Returns:
        ``{"positions": [j], "symbols": ["P1[2]", ...], "columns": [column of j], "chance": [J],
        "accuracy": [[[J] for k] for l], "column_accuracy": [[K] for l], "column_chance": [K]}``: ``j`` indexes
        the CoT symbols whose value varies across the training lines; ``column_accuracy[l][k]`` is the mean
        accuracy at layer ``l``, answer digit ``k`` over the CoT digits of column ``k`` (None: no such digit).
    """
    rows_train, rows_test = cot_symbols(train, train_path), cot_symbols(test, test_path)
    if len(rows_test[0]) != len(rows_train[0]):
        raise DataFormatError(f"the test CoTs have {len(rows_test[0])} symbols, the training ones "
                              f"{len(rows_train[0])}: the CoT probe needs one layout", test_path)
    vocab = {s: i for i, s in enumerate(sorted({s for row in rows_train + rows_test for s in row}))}
    y_train = torch.tensor([[vocab[s] for s in row] for row in rows_train])  # (N, C)
    y_test = torch.tensor([[vocab[s] for s in row] for row in rows_test])  # (N', C)
    columns = cot_columns(train[0].cot)
    varying = (y_train != y_train[:1]).any(0).tolist()
    positions = [j for j, (c, v) in enumerate(zip(columns, varying)) if c is not None and v]
    if not positions:
        raise DataFormatError("no CoT digit varies across the training lines: nothing for the CoT probe to decode",
                              train_path)
    y_train, y_test = y_train[:, positions], y_test[:, positions]  # (N, J), (N', J)
    majority = torch.mode(y_train, dim=0).values  # (J,)
    chance = (y_test == majority).double().mean(0)  # (J,)
    accuracy = torch.stack([
        (ridge_classify(x_train[:, l].transpose(0, 1), y_train, x_test[:, l].transpose(0, 1), len(vocab), ridge)
         == y_test).double().mean(1)  # (K, J)
        for l in range(x_train.shape[1])])  # (L+1, K, J); a loop over layers, each solving its K digits at once
    digits = x_train.shape[2]
    column = torch.tensor([columns[j][1] for j in positions])  # (J,)
    member = torch.nn.functional.one_hot(column, max(digits, int(column.max()) + 1))[:, :digits].double()  # (J, K)
    count = member.sum(0)  # (K,)
    per_column = torch.einsum("lkj,jk->lk", accuracy, member) / count.clamp_min(1)  # (L+1, K)
    column_chance = (chance @ member) / count.clamp_min(1)  # (K,)
    present = count > 0
    return {"positions": positions, "symbols": [f"{columns[j][0]}[{columns[j][1]}]" for j in positions],
            "columns": column.tolist(), "chance": chance.tolist(), "accuracy": accuracy.tolist(),
            "column_accuracy": [[v if p else None for v, p in zip(row, present.tolist())] for row in per_column.tolist()],
            "column_chance": [v if p else None for v, p in zip(column_chance.tolist(), present.tolist())]}


def probe_model(predictor: Probed, train: Sequence[Example], test: Sequence[Example], ridge: float = 1.0,
                train_path: str | None = None, test_path: str | None = None) -> dict:
    """R² of ``ĉ_k`` per layer and answer digit, and (when every line has a CoT) the CoT-digit probes.

    Returns:
        ``{"r2": [[R² for k] for l in 0..L], "layers": L + 1, "digits": K, "size": "NxM", "train": lines,
        "test": lines, "ridge": ridge, "cot": cot_probe(...) or None, "cot_targets": what the CoT probe decodes}``.

    Raises:
        DataFormatError: naming the file and line of a problem that is not ``NxM`` multiplication of the
            training size, or a file with fewer than 2 problems, or CoTs of different layouts.
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
    has_cot = all(ex.cot for ex in (*train, *test))
    cot = cot_probe(x_train, x_test, train, test, ridge, train_path, test_path) if has_cot else None
    return {"r2": r2, "layers": x_train.shape[1], "digits": digits, "size": f"{size[0]}x{size[1]}",
            "train": len(train), "test": len(test), "ridge": ridge, "cot": cot, "cot_targets": COT_TARGETS}


COT_TARGETS = ("the reference (teacher's) CoT symbols whose value varies across the training lines, one linear "
               "classifier per layer, answer digit and CoT symbol; column_accuracy[l][k]: their mean accuracy over "
               "the CoT digits of column k (digit 10^k of every partial product and running sum)")


def best_layers(result: dict) -> dict:
    """Per answer digit, the best layer's R² of ``ĉ_k`` and (None without a CoT probe) CoT column accuracy and its chance."""
    out = {"r2": [max(column) for column in zip(*result["r2"])], "cot": None, "cot_chance": None}  # (L+1, K) -> (K,)
    cot = result.get("cot")
    if cot:
        per_column = [[v for v in column if v is not None] for column in zip(*cot["column_accuracy"])]  # K x (L+1)
        out["cot"] = [max(column) if column else None for column in per_column]
        out["cot_chance"] = cot["column_chance"]
    return out


def _heatmap(ax, values: torch.Tensor, title: str, plt) -> None:
    """One (L+1, K) panel, the values written in its cells (NaN cells left blank)."""
    image = ax.imshow(values.numpy(), vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
    for (l, k), value in zip(torch.cartesian_prod(torch.arange(values.shape[0]), torch.arange(values.shape[1])).tolist(),
                             values.flatten().tolist()):
        if value == value:
            ax.text(k, l, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w" if value < 0.6 else "k")
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(values.shape[0]))
    ax.set_xlabel("answer digit k (least significant first)")
    ax.set_ylabel("layer (0: embeddings, L: output)", fontsize=8)
    ax.set_title(title, fontsize=8)
    plt.colorbar(image, ax=ax)


def plot_probe(result: dict, path: str, title: str) -> None:
    """Heatmaps (layers x answer digits): R² of ``ĉ_k`` and, with a CoT probe, the CoT column accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r2 = torch.tensor(result["r2"]).clamp(min=0)  # (L+1, K); below 0 is "no better than the mean"
    cot = result.get("cot")
    panels = 2 if cot else 1
    fig, axes = plt.subplots(1, panels, figsize=(panels * (2.2 + 0.6 * r2.shape[1]), 2.0 + 0.45 * r2.shape[0]),
                             squeeze=False)
    _heatmap(axes[0, 0], r2, "R² of the running sum ĉ_k (held out)", plt)
    if cot:
        accuracy = torch.tensor([[float("nan") if v is None else v for v in row] for row in cot["column_accuracy"]])
        chance = ", ".join("-" if c is None else f"{c:.2f}" for c in cot["column_chance"])
        _heatmap(axes[0, 1], accuracy, f"accuracy on the CoT digits of column k\n(chance by k: {chance})", plt)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
