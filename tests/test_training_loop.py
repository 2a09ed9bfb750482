"""Tests of the shared training loop and the teacher / no-CoT stages on tiny 2x2 multiplication."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import icot.devices
from icot.config import load_config
from icot.data import parse_line
from icot.data.multiplication import generate_examples
from icot.errors import ConfigError
from icot.models.lm import load_lm_dir
from icot.rundir import model_path, read_meta, stage_is_done
from icot.tokenizer import IGNORE_INDEX, Layout, build_word_tokenizer
from icot.training import stages
from icot.training.causal_lm import lm_batch
from icot.training.loop import Stage, lr_factor, train_stage


def _events(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == kind]


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits


def _valid_ids(stage) -> torch.Tensor:
    return lm_batch(stage.valid_items[:8], stage.layout.pad_id)["input_ids"]


def _with_snapshots(stage) -> list[dict]:
    """Record the stage's parameters at every validation (in order)."""
    snapshots: list[dict] = []
    validate = stage.validate

    def recording(module):
        snapshots.append({k: v.detach().clone() for k, v in module.state_dict().items()})
        return validate(module)

    stage.validate = recording
    return snapshots


# ---------------------------------------------------------------------------------------------
# Teacher stage end to end


def test_teacher_stage_run_trains_logs_and_finishes(tiny_config, tmp_path):
    out = tmp_path / "teacher"
    torch.manual_seed(tiny_config.teacher.seed)
    initial = stages.build("teacher", tiny_config).module  # the same draw stages.run makes
    assert not stage_is_done(out)

    torch.manual_seed(tiny_config.teacher.seed)
    result = stages.run("teacher", tiny_config, out, progress=False)
    cfg = tiny_config.teacher

    assert result["steps"] == cfg.max_steps
    assert result["examples"] == cfg.max_steps * cfg.batch_size
    assert stage_is_done(out)
    meta = read_meta(out)
    assert (meta["kind"], meta["stage"], meta["status"], meta["model"]) == ("stage", "teacher", "done", "best")
    assert meta["steps"] == cfg.max_steps and meta["best"] == result["best"]
    assert load_config(out / "config.yaml") == tiny_config

    train = _events(out, "train")
    assert [e["step"] for e in train] == list(range(cfg.log_every, cfg.max_steps + 1, cfg.log_every))
    assert all(e["loss"] > 0 and e["lr"] == pytest.approx(cfg.lr) for e in train)
    validate = _events(out, "validate")
    assert [e["step"] for e in validate] == list(range(cfg.eval_every, cfg.max_steps + 1, cfg.eval_every))
    for e in validate:
        assert 0.0 <= e["val_accuracy"] <= 1.0 and e["val_loss"] > 0

    # The saved model is the trained one: its weights moved away from the initial model's.
    best, tokenizer, best_meta = load_lm_dir(model_path(out))
    assert model_path(out) == out / "best"
    assert best_meta["layout"] == "explicit"
    initial_state = initial.state_dict()
    changed = [k for k, v in best.state_dict().items() if not torch.equal(v, initial_state[k])]
    assert "transformer.wte.weight" in changed and len(changed) >= len(initial_state) // 2
    # ...and it learned something: a validation loss below uniform guessing over the vocabulary.
    assert result["best"]["loss"] < torch.log(torch.tensor(float(len(tokenizer)))).item()


def test_best_checkpoint_is_the_best_validated_model(tiny_config, tmp_path):
    out = tmp_path / "teacher"
    stage = stages.build("teacher", tiny_config)
    initial = copy.deepcopy(stage.module.state_dict())
    snapshots = _with_snapshots(stage)
    result = train_stage(stage, tiny_config.teacher, out, tiny_config, progress=False)

    validate = _events(out, "validate")
    assert len(validate) == len(snapshots) == 2
    # Keep-best: the kept step has the highest (accuracy, -loss) of all validations.
    scores = [(e["val_accuracy"], -e["val_loss"]) for e in validate]
    kept = max(range(len(scores)), key=lambda i: scores[i])
    assert result["best"]["step"] == validate[kept]["step"]
    assert validate[0]["improved"] is True
    assert [e["improved"] for e in validate][1] == (scores[1] > scores[0])

    ids = _valid_ids(stage)
    reloaded, _, _ = load_lm_dir(out / "best")
    reference = copy.deepcopy(stage.module)
    reference.load_state_dict(snapshots[kept])
    assert torch.equal(_logits(reloaded, ids), _logits(reference, ids))
    # Reloading is deterministic, and the last step's model is what the stage holds in memory.
    again, _, _ = load_lm_dir(out / "best")
    assert torch.equal(_logits(again, ids), _logits(reloaded, ids))
    if kept == len(snapshots) - 1:
        assert torch.equal(_logits(stage.module, ids), _logits(reloaded, ids))
    # Training changed the parameters between the start and each validation.
    assert not torch.equal(snapshots[0]["transformer.wte.weight"], initial["transformer.wte.weight"])
    assert not torch.equal(snapshots[1]["transformer.wte.weight"], snapshots[0]["transformer.wte.weight"])


def test_same_seed_same_result(tiny_config, tmp_path):
    config = dataclasses.replace(tiny_config, teacher=dataclasses.replace(tiny_config.teacher, max_steps=3,
                                                                          eval_every=0))
    torch.manual_seed(1234)
    first = stages.run("teacher", config, tmp_path / "a", progress=False)
    torch.manual_seed(5678)  # e.g. another stage ran before in the same process
    second = stages.run("teacher", config, tmp_path / "b", progress=False)
    # Bitwise on CPU; CUDA's scatter-add in the embedding backward is not bitwise reproducible.
    tolerance = 1e-5 if torch.cuda.is_available() else 0.0
    assert first["best"]["loss"] == pytest.approx(second["best"]["loss"], abs=tolerance, rel=0)
    a, _, _ = load_lm_dir(tmp_path / "a" / "best")
    b, _, _ = load_lm_dir(tmp_path / "b" / "best")
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=tolerance, rtol=0)


def test_stage_is_done(tmp_path):
    assert not stage_is_done(tmp_path / "missing")
    assert not stage_is_done(tmp_path)  # no icot.json
    (tmp_path / "icot.json").write_text(json.dumps({"kind": "stage", "status": "running"}), encoding="utf-8")
    assert not stage_is_done(tmp_path)
    (tmp_path / "icot.json").write_text(json.dumps({"kind": "lm", "status": "done"}), encoding="utf-8")
    assert not stage_is_done(tmp_path)
    (tmp_path / "icot.json").write_text("{broken", encoding="utf-8")
    assert not stage_is_done(tmp_path)
    (tmp_path / "icot.json").write_text(json.dumps({"kind": "stage", "status": "done"}), encoding="utf-8")
    assert stage_is_done(tmp_path)


# ---------------------------------------------------------------------------------------------
# No-CoT stage: labels


def test_nocot_stage_layout_and_labels(tiny_config):
    stage = stages.build("nocot", tiny_config)
    assert stage.with_cot is False and stage.meta["layout"] == "nocot"
    assert all(e.s2 == -1 and e.answer_start == e.s1 + 1 for e in stage.train_items)
    # No CoT symbol reaches the no-CoT model: the sequence is INPUT <sep> ANSWER <eos>.
    assert all(len(e.ids) == e.s1 + 1 + 4 + 1 for e in stage.train_items)  # 2x2: 4 answer digits
    batch = stage.collate(stage.train_items[:5])
    ids, labels = batch["input_ids"], batch["labels"]
    for row, e in enumerate(stage.train_items[:5]):
        assert (labels[row, : e.s1 + 1] == IGNORE_INDEX).all()
        assert torch.equal(labels[row, e.s1 + 1:], ids[row, e.s1 + 1:])
        assert batch["s1"][row] == e.s1


def test_teacher_and_nocot_share_the_vocabulary(tiny_config):
    teacher, nocot = stages.build("teacher", tiny_config), stages.build("nocot", tiny_config)
    assert teacher.tokenizer.get_vocab() == nocot.tokenizer.get_vocab()
    # The same INPUT <sep> prefix for both layouts.
    for t, n in zip(teacher.train_items[:10], nocot.train_items[:10]):
        assert t.ids[: t.s1 + 1] == n.ids[: n.s1 + 1]
        assert t.ids[t.answer_start:] == n.ids[n.answer_start:]


def test_lm_batch_masks_prompt_and_padding():
    examples = [parse_line(x) for x in generate_examples(2, 2, 2, seed=0) + generate_examples(3, 2, 2, seed=0)]
    layout = Layout(build_word_tokenizer(examples))
    for with_cot in (False, True):
        items = [layout.encode(ex, with_cot) for ex in examples]
        assert len({len(e.ids) for e in items}) == 2  # two lengths: right padding is needed
        batch = lm_batch(items, layout.pad_id)
        width = max(len(e.ids) for e in items)
        assert batch["input_ids"].shape == batch["labels"].shape == (len(items), width)
        for row, e in enumerate(items):
            n = len(e.ids)
            assert batch["input_ids"][row, :n].tolist() == e.ids
            assert (batch["input_ids"][row, n:] == layout.pad_id).all()
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
            expected = [IGNORE_INDEX] * (e.s1 + 1) + e.ids[e.s1 + 1:] + [IGNORE_INDEX] * (width - n)
            assert batch["labels"][row].tolist() == expected
            assert (batch["s1"][row], batch["s2"][row]) == (e.s1, e.s2)


def test_nocot_stage_trains(tiny_config, tmp_path):
    out = tmp_path / "nocot"
    result = stages.run("nocot", tiny_config, out, progress=False)
    assert stage_is_done(out) and read_meta(out)["stage"] == "nocot"
    model, _, meta = load_lm_dir(model_path(out))
    assert meta["layout"] == "nocot"
    assert result["steps"] == tiny_config.nocot.max_steps


def test_init_from_starts_from_another_stage(session_config, trained_teacher):
    config = dataclasses.replace(session_config, nocot=dataclasses.replace(session_config.nocot,
                                                                           init_from=str(trained_teacher)))
    stage = stages.build("nocot", config)
    teacher, tokenizer, _ = load_lm_dir(trained_teacher / "best")
    assert stage.tokenizer.get_vocab() == tokenizer.get_vocab()
    ids = _valid_ids(stage)
    assert torch.equal(_logits(stage.module, ids), _logits(teacher, ids))


def test_bpe_teacher_trains_and_reloads(tiny_config, tmp_path):
    config = dataclasses.replace(tiny_config, model=dataclasses.replace(tiny_config.model, tokenizer="bpe",
                                                                        bpe_vocab_size=300),
                                 teacher=dataclasses.replace(tiny_config.teacher, max_steps=3, eval_every=0))
    stage = stages.build("teacher", config)
    assert stage.layout.unk_id is None and len(stage.tokenizer) <= 300
    train_stage(stage, config.teacher, tmp_path, config, progress=False)
    model, tokenizer, _ = load_lm_dir(tmp_path / "best")
    assert tokenizer.get_vocab() == stage.tokenizer.get_vocab()
    ids = _valid_ids(stage)
    assert torch.equal(_logits(model.to(stage.module.device), ids), _logits(stage.module, ids))


# ---------------------------------------------------------------------------------------------
# The loop itself, on a toy stage


class ToyStage(Stage):
    """Next-symbol classification with an embedding and a linear head; every hook is observable."""

    name = "toy"

    def __init__(self, n: int = 64, sleep: float = 0.0, fail_at_call: int = 0):
        torch.manual_seed(0)
        self.module = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 10, (n,), generator=g)
        self.train_items = [(int(a), int((a + 3) % 10)) for a in x]
        self.sleep, self.fail_at_call, self.calls = sleep, fail_at_call, 0

    def collate(self, items):
        return {"x": torch.tensor([a for a, _ in items]), "y": torch.tensor([b for _, b in items])}

    def loss(self, module, batch):
        self.calls += 1
        if self.fail_at_call and self.calls >= self.fail_at_call:
            raise RuntimeError("killed")
        if self.sleep:
            time.sleep(self.sleep)
        return nn.functional.cross_entropy(module(batch["x"]), batch["y"]), {"calls": float(self.calls)}

    def validate(self, module):
        x = torch.arange(10, device=next(module.parameters()).device)
        logits = module(x)
        return {"loss": nn.functional.cross_entropy(logits, (x + 3) % 10).item(),
                "accuracy": (logits.argmax(-1) == (x + 3) % 10).float().mean().item()}

    def save(self, module, path):
        torch.save(module.state_dict(), path / "weights.pt")


def _toy_cfg(tiny_config, **changes):
    return dataclasses.replace(tiny_config.teacher, **{"batch_size": 8, "lr": 0.05, "max_steps": 12,
                                                      "eval_every": 4, "log_every": 2, "epochs": 100.0,
                                                      **changes})


def test_frozen_parameter_does_not_change(tiny_config, tmp_path):
    stage = ToyStage()
    embedding, head = stage.module[0], stage.module[1]
    embedding.weight.requires_grad_(False)
    frozen = embedding.weight.detach().clone()
    head_before = head.weight.detach().clone()
    # Weight decay would move a frozen parameter if it were handed to AdamW.
    result = train_stage(stage, _toy_cfg(tiny_config, weight_decay=0.5), tmp_path, tiny_config, progress=False)
    assert result["steps"] == 12
    assert torch.equal(embedding.weight, frozen)
    assert not torch.equal(head.weight, head_before)
    saved = torch.load(tmp_path / "best" / "weights.pt")
    assert torch.equal(saved["0.weight"], frozen)
    # The extra scalars of `loss` are logged with the training loss.
    assert all("calls" in e for e in _events(tmp_path, "train"))


def test_grad_accumulation_counts_optimizer_steps(tiny_config, tmp_path):
    stage = ToyStage(n=64)
    result = train_stage(stage, _toy_cfg(tiny_config, grad_accum=2, max_steps=6, eval_every=0), tmp_path,
                         tiny_config, progress=False)
    assert result["steps"] == 6 and result["examples"] == 6 * 8
    assert stage.calls == 12  # two micro-batches of 4 per optimizer step


class Watched(torch.Tensor):
    """A tensor that counts the reads of its value into Python (each one a host-device sync on an accelerator);
    ``detach``, ``float`` and ``stack`` keep the class, so the loop's copies of a loss stay watched."""

    reads = 0

    def item(self):
        Watched.reads += 1
        return super().item()

    def tolist(self):
        Watched.reads += 1
        return super().tolist()

    def __float__(self):
        Watched.reads += 1
        return super().__float__()


class WatchedStage(ToyStage):
    """A toy stage whose loss and extra scalar are watched tensors; it keeps each loss's value to compare."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.losses = []

    def loss(self, module, batch):
        loss, _ = super().loss(module, batch)
        self.losses.append(float(loss.detach()))
        return loss.as_subclass(Watched), {"calls": torch.tensor(float(self.calls)).as_subclass(Watched)}


def test_losses_are_read_back_when_logged_not_every_step(tiny_config, tmp_path):
    Watched.reads = 0
    stage = WatchedStage(n=64)
    train_stage(stage, _toy_cfg(tiny_config, grad_accum=2, max_steps=12, log_every=4, eval_every=0), tmp_path,
                tiny_config, progress=False)
    logs = _events(tmp_path, "train")
    assert [e["step"] for e in logs] == [4, 8, 12]
    # 24 micro-batches, but per log one read of the pending losses and one of the extra scalar.
    assert Watched.reads == 2 * len(logs)
    for i, e in enumerate(logs):  # the deferred reads log what an immediate read would have
        assert e["loss"] == pytest.approx(sum(stage.losses[8 * i:8 * i + 8]) / 8)
        assert e["calls"] == 8 * (i + 1)


def test_epochs_bound_the_steps(tiny_config, tmp_path):
    stage = ToyStage(n=40)  # 5 batches of 8 per epoch
    result = train_stage(stage, _toy_cfg(tiny_config, max_steps=0, epochs=2.0, eval_every=0), tmp_path,
                         tiny_config, progress=False)
    assert result["steps"] == 10


def test_time_budget_stops_early(tiny_config, tmp_path):
    stage = ToyStage(n=64, sleep=0.05)
    cfg = _toy_cfg(tiny_config, max_steps=0, epochs=1000.0, max_minutes=0.5 / 60, eval_every=0)
    start = time.monotonic()
    result = train_stage(stage, cfg, tmp_path, tiny_config, progress=False)
    assert time.monotonic() - start < 10
    assert 1 <= result["steps"] < 1000 * 8
    assert result["steps"] <= 0.5 / 0.05 + 1
    # Validation still runs before stopping, and the stage is complete.
    validate = _events(tmp_path, "validate")
    assert [e["step"] for e in validate] == [result["steps"]]
    assert stage_is_done(tmp_path) and (tmp_path / "best" / "weights.pt").is_file()


class ScriptedStage(ToyStage):
    """A toy stage whose validations return the scripted ``(loss, eligible)`` or ``(loss, eligible, accuracy)``
    in turn (accuracy 0 unless scripted), from index ``first``."""

    def __init__(self, script, first: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.script, self.next = script, first

    def validate(self, module):
        loss, eligible, *accuracy = self.script[self.next]
        self.next += 1
        return {"loss": loss, "accuracy": accuracy[0] if accuracy else 0.0, "eligible": eligible}


# Validations at steps 4, 8, ...: the kept model improves at 8 (loss 2.0), at 12 only by a loss not yet
# eligible for keeping, then no more; with patience 3 the run stops at the third stale validation, step 24.
SCRIPT = [(3.0, True), (2.0, True), (1.0, False), (2.5, True), (2.0, True), (2.1, True), (0.5, True)]


def test_patience_stops_after_that_many_stale_validations(tiny_config, tmp_path):
    cfg = _toy_cfg(tiny_config, max_steps=40, patience=3)
    result = train_stage(ScriptedStage(SCRIPT), cfg, tmp_path, tiny_config, progress=False)
    assert (result["steps"], result["stopped_by"]) == (24, "patience")
    assert result["best"]["step"] == 8 and result["best"]["loss"] == 2.0
    validate = _events(tmp_path, "validate")
    # No validation of its own after the stop: the last one was at the stopping step.
    assert [e["step"] for e in validate] == [4, 8, 12, 16, 20, 24]
    assert [e["improved"] for e in validate] == [True, True, False, False, False, False]
    assert read_meta(tmp_path)["stopped_by"] == "patience"


def test_patience_zero_trains_the_whole_budget(tiny_config, tmp_path):
    result = train_stage(ScriptedStage(SCRIPT), _toy_cfg(tiny_config, max_steps=28), tmp_path, tiny_config,
                         progress=False)
    assert (result["steps"], result["stopped_by"]) == (28, "max_steps")


def test_patience_count_survives_resume(tiny_config, tmp_path):
    cfg = _toy_cfg(tiny_config, max_steps=40, patience=3, save_every=16)
    with pytest.raises(RuntimeError, match="killed"):  # after the checkpoint at step 16 (one stale validation)
        train_stage(ScriptedStage(SCRIPT, fail_at_call=18), cfg, tmp_path, tiny_config, progress=False)
    result = train_stage(ScriptedStage(SCRIPT, first=4), cfg, tmp_path, tiny_config, progress=False, resume=True)
    # Counting afresh from the checkpoint would have gone past step 24 (to the improvement at 28).
    assert (result["steps"], result["stopped_by"]) == (24, "patience")


# Validations at steps 4, 8, 12, 16: the loss falls throughout while exact match is one line's noise, as in
# kd-4x4's couple stage (0.5% of 200 lines once, early, then 0%).
NOISY_EXACT = [(0.72, True, 0.005), (0.70, True, 0.0), (0.68, True, 0.0), (0.66, True, 0.0)]


@pytest.mark.parametrize("by, kept, improved", [("accuracy", 4, [True, False, False, False]),
                                                ("loss", 16, [True, True, True, True])])
def test_keep_best_by_ranks_validations_by_exact_match_or_by_loss(tiny_config, tmp_path, by, kept, improved):
    cfg = _toy_cfg(tiny_config, max_steps=16, keep_best_by=by)
    stage = ScriptedStage(NOISY_EXACT)
    snapshots = _with_snapshots(stage)
    result = train_stage(stage, cfg, tmp_path, tiny_config, progress=False)
    assert result["best"]["step"] == kept
    assert [e["improved"] for e in _events(tmp_path, "validate")] == improved
    # The kept weights are the ones validated at that step, not the last ones.
    saved = torch.load(tmp_path / "best" / "weights.pt", weights_only=True)  # the test's own file
    assert all(torch.equal(saved[k], v) for k, v in snapshots[kept // 4 - 1].items())
    assert not torch.equal(snapshots[0]["0.weight"], snapshots[-1]["0.weight"])  # so the match names one step


def test_keep_best_by_patience_counts_what_it_ranks(tiny_config, tmp_path):
    # Ranked by exact match the loss's fall is stale after step 4, and patience 2 stops the run at step 12.
    cfg = _toy_cfg(tiny_config, max_steps=16, patience=2)
    assert train_stage(ScriptedStage(NOISY_EXACT), cfg, tmp_path / "a", tiny_config,
                       progress=False)["steps"] == 12
    cfg = _toy_cfg(tiny_config, max_steps=16, patience=2, keep_best_by="loss")
    result = train_stage(ScriptedStage(NOISY_EXACT), cfg, tmp_path / "b", tiny_config, progress=False)
    assert (result["steps"], result["stopped_by"]) == (16, "max_steps")


def test_linear_warmup_then_constant(tiny_config, tmp_path):
    cfg = _toy_cfg(tiny_config, warmup_steps=4, log_every=1, max_steps=8, eval_every=0)
    train_stage(ToyStage(), cfg, tmp_path, tiny_config, progress=False)
    lrs = [e["lr"] for e in _events(tmp_path, "train")]
    assert len(lrs) == 8
    assert lrs == sorted(lrs) and lrs[0] < cfg.lr
    assert lrs[-1] == pytest.approx(cfg.lr) and lrs[4] == pytest.approx(cfg.lr)
    assert lrs[1] - lrs[0] == pytest.approx(cfg.lr / cfg.warmup_steps)  # linear


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decay_reaches_the_floor_at_the_last_step(tiny_config, tmp_path, schedule):
    cfg = _toy_cfg(tiny_config, warmup_steps=2, log_every=1, max_steps=10, eval_every=0,
                   lr_schedule=schedule, min_lr_ratio=0.1)
    train_stage(ToyStage(), cfg, tmp_path, tiny_config, progress=False)
    # The logged lr is the one the next step will use: step k logs lr_factor(k + 1).
    lrs = [e["lr"] / cfg.lr for e in _events(tmp_path, "train")]
    expected = [lr_factor(k + 1, cfg, 10) for k in range(10)]
    assert lrs == pytest.approx(expected)
    assert lrs[1] == pytest.approx(1.0)  # warm-up done
    assert lrs[2:] == sorted(lrs[2:], reverse=True) and lrs[-1] == pytest.approx(0.1)
    middle = lr_factor(6, cfg, 10)  # halfway through the decay
    assert middle == pytest.approx(0.55)  # both schedules pass the mid-point of [0.1, 1] there


def test_lr_schedule_is_range_checked(tiny_config):
    # The loader checks the choices; a training section is range-checked in its IcotConfig, under its name.
    with pytest.raises(ConfigError, match="teacher.lr_schedule"):
        load_config(None, {"teacher": {"lr_schedule": "step"}})
    with pytest.raises(ConfigError, match="teacher.min_lr_ratio"):
        dataclasses.replace(tiny_config, teacher=_toy_cfg(tiny_config, min_lr_ratio=1.5))


def test_too_few_examples_for_one_batch(tiny_config, tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_stage(ToyStage(n=5), _toy_cfg(tiny_config), tmp_path, tiny_config, progress=False)


def test_interrupted_rerun_is_not_done(tiny_config, tmp_path):
    train_stage(ToyStage(), _toy_cfg(tiny_config), tmp_path, tiny_config, progress=False)
    assert stage_is_done(tmp_path)
    with pytest.raises(RuntimeError, match="killed"):
        train_stage(ToyStage(fail_at_call=7), _toy_cfg(tiny_config, eval_every=2), tmp_path, tiny_config,
                    progress=False)
    assert not stage_is_done(tmp_path)


# ---------------------------------------------------------------------------------------------
# Context length


def _with_positions(config, n_positions, **section):
    model = dataclasses.replace(config.model, n_positions=n_positions)
    return dataclasses.replace(config, model=model,
                               teacher=dataclasses.replace(config.teacher, **section),
                               nocot=dataclasses.replace(config.nocot, **section))


def _longest(config, with_cot):
    stage = stages.build("teacher" if with_cot else "nocot", config)
    return max(len(e.ids) for e in stage.train_items)


def test_training_lines_longer_than_the_context_are_refused(tiny_config):
    longest = _longest(tiny_config, True)
    config = _with_positions(tiny_config, longest - 1)
    with pytest.raises(ConfigError) as info:
        stages.build("teacher", config)
    message = str(info.value)
    assert message.startswith(f"{tiny_config.data.train}:1: ") and "line 1 " in message and "never truncated" in message
    assert "model.n_positions" in message and str(longest) in message


def test_validation_lines_longer_than_the_context_are_refused(tiny_config, tmp_path):
    longer = tmp_path / "valid_3x2.txt"
    longer.write_text("".join(x + "\n" for x in generate_examples(3, 2, 10, seed=0)), encoding="utf-8")
    config = _with_positions(tiny_config, _longest(tiny_config, True))
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, valid=str(longer)))
    with pytest.raises(ConfigError, match=str(longer)):
        stages.build("teacher", config)


def test_bf16_mixed_precision_autocasts_the_forward_and_keeps_float32_weights(tiny_config, tmp_path):
    """``mixed_precision: bf16`` (on CPU here, on the GPU where there is one): matrix products run in
    bfloat16 under autocast while the weights, their updates and the saved model stay float32."""
    # A stage without mixed precision first, as in a pipeline whose stages differ: the process's
    # Accelerate state must not pin the first stage's precision on the next.
    stages.run("nocot", tiny_config, tmp_path / "nocot", progress=False)
    config = dataclasses.replace(tiny_config, teacher=dataclasses.replace(tiny_config.teacher, mixed_precision="bf16"))
    torch.manual_seed(0)
    stage = stages.build("teacher", config)
    before = {k: v.detach().clone() for k, v in stage.module.state_dict().items()}
    seen: set[torch.dtype] = set()
    stage.module.transformer.h[0].mlp.c_fc.register_forward_hook(lambda mod, args, out: seen.add(out.dtype))

    result = train_stage(stage, config.teacher, tmp_path / "teacher", config, progress=False)

    assert torch.bfloat16 in seen
    assert result["steps"] == config.teacher.max_steps
    assert all(math.isfinite(e["loss"]) for e in _events(tmp_path / "teacher", "train"))
    model, _, _ = load_lm_dir(model_path(tmp_path / "teacher"))
    after = model.state_dict()
    assert {v.dtype for v in after.values() if v.is_floating_point()} == {torch.float32}
    assert not torch.equal(after["transformer.h.0.mlp.c_fc.weight"], before["transformer.h.0.mlp.c_fc.weight"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="trains on the GPU there, which decides by itself")
@pytest.mark.parametrize("native, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_mixed_precision_trains_in_what_the_device_runs_natively(tiny_config, tmp_path, monkeypatch, capsys,
                                                                      native, dtype):
    """``mixed_precision: auto`` autocasts to bf16 on a CPU with native bf16 and trains in fp32 on one that
    emulates it, saying which on stderr and in the stage's result; the saved config keeps ``auto``."""
    monkeypatch.setattr(icot.devices, "cpu_runs_bf16_natively", lambda: (native, "the reason"))
    teacher = dataclasses.replace(tiny_config.teacher, mixed_precision="auto", max_steps=2, eval_every=0)
    config = dataclasses.replace(tiny_config, teacher=teacher)
    stage = stages.build("teacher", config)
    seen: set[torch.dtype] = set()
    stage.module.transformer.h[0].mlp.c_fc.register_forward_hook(lambda mod, args, out: seen.add(out.dtype))

    result = train_stage(stage, config.teacher, tmp_path / "teacher", config, progress=False)

    assert seen == {dtype}
    picked = "bf16" if native else "no"
    assert f"[icot] teacher: mixed_precision auto -> {picked}: the reason" in capsys.readouterr().err
    assert result["mixed_precision"] == picked and read_meta(tmp_path / "teacher")["mixed_precision"] == picked
    assert load_config(tmp_path / "teacher" / "config.yaml").teacher.mixed_precision == "auto"


@pytest.mark.slow
def test_compile_trains_the_compiled_module_like_the_eager_one(tiny_config, tmp_path):
    """``compile: true`` runs the loss through ``torch.compile``'s module and gives the eager run's losses."""
    short = dataclasses.replace(tiny_config.nocot, max_steps=6, log_every=1, eval_every=0)
    losses = {}
    for compiled in (False, True):
        config = dataclasses.replace(tiny_config, nocot=dataclasses.replace(short, compile=compiled))
        torch.manual_seed(0)
        stage = stages.build("nocot", config)
        kinds = set()
        loss = stage.loss
        stage.loss = lambda module, batch: (kinds.add(type(module).__name__), loss(module, batch))[1]
        train_stage(stage, config.nocot, tmp_path / str(compiled), config, progress=False)
        assert ("OptimizedModule" in kinds) == compiled
        losses[compiled] = [e["loss"] for e in _events(tmp_path / str(compiled), "train")]
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


def test_tensorboard_tracking_mirrors_metrics_jsonl(tiny_config, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = dataclasses.replace(tiny_config, nocot=dataclasses.replace(tiny_config.nocot, log_with="tensorboard"))
    out = tmp_path / "nocot"
    stages.run("nocot", config, out, progress=False)
    events = EventAccumulator(str(next((out / "tracking").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in logged if r["event"] == "train"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(s, pytest.approx(v)) for s, v in losses]
    assert {e.step for e in events.Scalars("validate/val_accuracy")} == {r["step"] for r in logged if r["event"] == "validate"}


def test_an_unknown_tracker_is_refused_when_the_config_loads(tiny_config):
    with pytest.raises(ConfigError, match="field 'nocot.log_with': must be"):
        load_config(None, {"nocot": {"log_with": "tensorbored"}})
