"""Stepwise internalization (ICoT-SI): the removal schedule, the smoothing law, reset points, and the
fully internalized model that never sees or writes a CoT token."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from icot.data.multiplication import generate_examples
from icot.errors import ConfigError, TrainingInterrupted
from icot.evaluation import load_predictor
from icot.rundir import model_path, read_meta
from icot.training import stages
from icot.training.causal_lm import lm_batch
from icot.training.loop import train_stage
from icot.training.stepwise import cut_encoded, removal_offsets, remove_cot_tokens
from interrupts import signal_at_call


def test_offsets_follow_exp_minus_lambda_o():
    g = torch.Generator().manual_seed(0)
    n, lam = 40_000, 1.0
    o = removal_offsets(n, lam, g)
    for k in range(4):
        expected = math.exp(-lam * k) * (1 - math.exp(-lam))
        assert abs((o == k).float().mean().item() - expected) < 0.01
    paper = removal_offsets(n, 4.0, g)
    assert abs((paper == 0).float().mean().item() - (1 - math.exp(-4.0))) < 0.005
    assert torch.equal(removal_offsets(50, math.inf, g), torch.zeros(50, dtype=torch.long))


@pytest.fixture
def si_config(tiny_config):
    section = dataclasses.replace(tiny_config.teacher, max_steps=30, eval_every=5, batch_size=16)
    si = dataclasses.replace(tiny_config.si, remove_per_epoch=4, steps_per_epoch=8, removal_smoothing_lambda=math.inf,
                             from_teacher=False)
    return dataclasses.replace(tiny_config, stepwise=section, si=si)


def with_schedule(config, **si):
    """``config`` with the given ``si`` fields and a training budget long enough for any of these schedules."""
    section = dataclasses.replace(config.stepwise, epochs=100, max_steps=0)
    return dataclasses.replace(config, stepwise=section, si=dataclasses.replace(config.si, **si))


def original_schedule(n_steps: int, steps_per_epoch: int, remove_per_epoch: float, cot_len: int):
    """The original code's rule (Internalize_CoT_Step_by_Step, train.py), restated as a reference: a batch
    counter that adds one token when it reaches round(E / r), and an optimizer reset at each addition
    unless the previous batch already had its whole CoT removed. Returns (removed per step, reset steps)."""
    per_token = int(round(steps_per_epoch / remove_per_epoch))
    scheduled, counter, removed, resets = 0, 0, [], []
    for step in range(n_steps):
        prev = scheduled
        if counter == per_token or per_token == 0:
            scheduled += 1
            counter = 0
        counter += 1
        if scheduled > prev and prev < cot_len:  # prev < cot_len: the previous batch still had CoT
            resets.append(step)
        removed.append(min(scheduled, cot_len))
    return removed, resets


@pytest.mark.parametrize("steps_per_epoch, remove_per_epoch", [(4, 3), (8, 2), (10, 4), (25, 8), (3, 8)])
def test_schedule_and_reset_points_match_the_original(si_config, steps_per_epoch, remove_per_epoch):
    stage = stages.build("stepwise", with_schedule(si_config, steps_per_epoch=steps_per_epoch,
                                                   remove_per_epoch=remove_per_epoch))
    n = 120
    resets = [s for s in range(n) if stage.begin_step(s)]
    removed = [stage.removal_at(s) for s in range(n)]
    ref_removed, ref_resets = original_schedule(n, steps_per_epoch, remove_per_epoch, stage.max_cot)
    assert removed == ref_removed
    assert resets == ref_resets
    assert stage.cot_gone_at() == ref_removed.index(stage.max_cot)


def test_one_token_at_a_time(si_config):
    # 2x2 multiplication CoT: "P0 + P1" = 3 + 1 + 4 tokens. E = 8 steps, r = 2: one token every 4 steps.
    stage = stages.build("stepwise", with_schedule(si_config, steps_per_epoch=8, remove_per_epoch=2))
    assert stage.max_cot == 8 and stage.per_token == 4
    removed = [stage.removal_at(s) for s in range(40)]
    assert removed[:4] == [0] * 4 and removed[4:8] == [1] * 4 and removed[28:32] == [7] * 4
    assert all(r == 8 for r in removed[32:])
    assert stage.reset_steps == [4, 8, 12, 16, 20, 24, 28, 32]  # never again once the CoT is gone


def test_no_reset_without_reset_optimizer(si_config):
    stage = stages.build("stepwise", with_schedule(si_config, reset_optimizer=False))
    assert not any(stage.begin_step(s) for s in range(40))
    assert stage.cot_gone_at() > 0


def test_reset_warmup_ramps_after_each_reset(si_config):
    stage = stages.build("stepwise", with_schedule(si_config, steps_per_epoch=8, remove_per_epoch=2,
                                                   reset_warmup_steps=2))
    scales = [stage.lr_scale(s) for s in range(10)]
    assert scales == [1.0, 1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 0.5, 1.0]
    assert stage.lr_scale(33) == 1.0 and stage.lr_scale(32) == 0.5
    off = stages.build("stepwise", si_config)
    assert all(off.lr_scale(s) == 1.0 for s in range(40))


def test_budget_that_ends_before_the_cot_is_gone_is_refused(si_config, tmp_path):
    # One token every 2 steps, 8 tokens: gone at step 16, so a 16-step budget keeps nothing.
    short = dataclasses.replace(si_config, stepwise=dataclasses.replace(si_config.stepwise, max_steps=16))
    with pytest.raises(ConfigError, match="ends before the CoT is gone at step 16"):
        stages.build("stepwise", short).check_budget()
    with pytest.raises(ConfigError, match="ends before the CoT is gone at step 16"):
        train_stage(stages.build("stepwise", short), short.stepwise, tmp_path / "si", short, progress=False)
    assert not (tmp_path / "si").exists()  # refused before the run touched its directory
    enough = dataclasses.replace(si_config, stepwise=dataclasses.replace(si_config.stepwise, max_steps=17))
    stage = stages.build("stepwise", enough)
    stage.check_budget()
    assert stage.cot_gone_at() == 16


def test_lr_follows_the_reset_warmup_in_training(si_config, tmp_path):
    config = dataclasses.replace(si_config, si=dataclasses.replace(si_config.si, reset_warmup_steps=2),
                                 stepwise=dataclasses.replace(si_config.stepwise, log_every=1, eval_every=0))
    train_stage(stages.build("stepwise", config), config.stepwise, tmp_path / "si", config, progress=False)
    logs = [json.loads(line) for line in (tmp_path / "si" / "metrics.jsonl").read_text().splitlines()]
    lr = {e["step"]: e["lr"] for e in logs if e["event"] == "train"}  # the rate of the next step
    base = config.stepwise.lr
    # Resets at steps 2, 4, ..., 16: half the rate on each reset step, the full rate on the next.
    assert lr[2] == pytest.approx(base / 2) and lr[3] == pytest.approx(base)
    assert lr[16] == pytest.approx(base / 2) and lr[17] == pytest.approx(base) and lr[20] == pytest.approx(base)


def test_remove_all_when_remove_beyond(si_config):
    config = dataclasses.replace(si_config, si=dataclasses.replace(si_config.si, remove_all_when_remove_beyond=2))
    stage = stages.build("stepwise", config)
    # One token every 2 steps: 3 tokens at step 6, beyond 2, so everything goes.
    assert stage.removal_at(5) == 2 and stage.removal_at(6) == stage.max_cot


def test_vectorized_removal_equals_reference(si_config):
    stage = stages.build("stepwise", si_config)
    items = stage.train_items[:6]
    batch = lm_batch(items, stage.layout.pad_id)
    remove = torch.tensor([0, 1, 3, 7, 8, 50])
    cut = remove_cot_tokens(batch, remove, stage.layout.pad_id)
    for b, (item, r) in enumerate(zip(items, remove.tolist())):
        ref = cut_encoded(item, r)
        n = cut["attention_mask"][b].sum().item()
        assert cut["input_ids"][b, :n].tolist() == ref.ids
        assert cut["s2"][b].item() == ref.s2
        # Loss only after the first <sep>.
        assert (cut["labels"][b, : item.s1 + 1] == -100).all()
    # A fully removed row is exactly the no-CoT layout.
    nocot = stage.layout.encode(stage.valid[0], with_cot=False)
    full = remove_cot_tokens(lm_batch([stage.valid_items[0]], stage.layout.pad_id), torch.tensor([99]), 0)
    assert full["input_ids"][0, : len(nocot.ids)].tolist() == nocot.ids


def test_stage_removes_resets_and_keeps_only_internalized(si_config, tmp_path):
    stage = stages.build("stepwise", si_config)
    fed: list[torch.Tensor] = []
    forward = stage.module.forward

    def spy(*args, **kwargs):
        if stage.module.training:  # training batches only, not validation decoding
            fed.append((stage.removed, kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()))
        return forward(*args, **kwargs)

    stage.module.forward = spy
    train_stage(stage, si_config.stepwise, tmp_path / "si", si_config, progress=False)
    events = [json.loads(line) for line in (tmp_path / "si" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "optimizer_reset"] == [2, 4, 6, 8, 10, 12, 14, 16]
    vals = [e for e in events if e["event"] == "validate"]
    # Validation after step 5 sees the removal of step index 4, and so on.
    assert [v["val_cot_removed"] for v in vals][:4] == [2.0, 4.0, 7.0, 8.0]
    kept = [v for v in vals if v["improved"]]
    assert kept and all(v["val_eligible"] == 1.0 for v in kept)

    # After the final removal step, every fed sequence is INPUT <sep> ANSWER <eos>: one <sep> before
    # the answer and nothing else, so no CoT token is ever fed.
    sep = stage.layout.sep_id
    final = [(ids, mask) for removed, ids, mask in fed if removed == stage.max_cot]
    assert final, "training must reach the fully internalized format"
    for ids, mask in final:
        n_sep = ((ids == sep) & (mask == 1)).sum(1)
        assert (n_sep == 2).all()  # the <sep> after INPUT and the closing <eos>
    assert read_meta(model_path(tmp_path / "si"))["layout"] == "nocot"
    predictor = load_predictor(str(tmp_path / "si"))
    preds = predictor.predict([ex.input for ex in stage.valid[:5]])
    assert all(p.cot == "" for p in preds)


def test_cut_batch_drops_the_columns_no_row_uses(si_config):
    stage = stages.build("stepwise", si_config)
    batch = lm_batch(stage.train_items[:4], stage.layout.pad_id)
    width = batch["input_ids"].shape[1]
    cut = remove_cot_tokens(batch, torch.tensor([3, 3, 5, 3]), stage.layout.pad_id)
    assert cut["input_ids"].shape[1] == width - 3  # the longest row lost 3 tokens
    assert cut["attention_mask"][:, -1].any()  # the last column is some row's token
    for key in ("input_ids", "attention_mask", "labels"):
        assert cut[key].shape == cut["input_ids"].shape


def test_from_scratch_ignores_the_teacher(si_config, trained_teacher):
    fresh = stages.build("stepwise", si_config, teacher=str(trained_teacher))
    teacher_config = dataclasses.replace(si_config, si=dataclasses.replace(si_config.si, from_teacher=True))
    from_teacher = stages.build("stepwise", teacher_config, teacher=str(trained_teacher))
    with pytest.raises(ConfigError, match="needs --teacher"):
        stages.build("stepwise", teacher_config)
    teacher_weights = load_predictor(str(trained_teacher)).model.state_dict()
    name = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(from_teacher.model.state_dict()[name], teacher_weights[name])
    assert not torch.equal(fresh.model.state_dict()[name], teacher_weights[name])


def test_answer_marker_survives_the_cut(si_config, trained_teacher):
    marked = dataclasses.replace(si_config, model=dataclasses.replace(si_config.model, answer_marker="####"))
    stage = stages.build("stepwise", marked)
    marker = stage.layout.marker_ids
    assert marker
    item = stage.valid_items[0]
    nocot = stage.layout.encode(stage.valid[0], with_cot=False)
    full = remove_cot_tokens(lm_batch([item], stage.layout.pad_id), torch.tensor([99]), stage.layout.pad_id)
    assert full["input_ids"][0].tolist() == nocot.ids  # INPUT <sep> #### ANSWER <eos>
    assert cut_encoded(item, 99) == nocot
    # A stage may not start from a model whose layout has another marker.
    with pytest.raises(ConfigError, match="answer_marker"):
        stages.build("stepwise", dataclasses.replace(marked, si=dataclasses.replace(si_config.si, from_teacher=True)),
                     teacher=str(trained_teacher))


def original_kept_positions(width_before: int, s1: int, removed: int, width_after: int) -> list[int]:
    """The original's keep_position rule, restated: arange over the uncut row, ``+= removed`` from the
    first <sep> on, then cut to the new length."""
    positions = list(range(width_before))
    positions[s1:] = [p + removed for p in positions[s1:]]
    return positions[:width_after]


def test_keep_position_ids_follow_the_original(si_config):
    stage = stages.build("stepwise", si_config)
    items = stage.train_items[:4]
    batch = lm_batch(items, stage.layout.pad_id)
    remove = torch.tensor([0, 2, 5, 99])
    cut = remove_cot_tokens(batch, remove, stage.layout.pad_id, keep_position=True)
    plain = remove_cot_tokens(batch, remove, stage.layout.pad_id)
    assert "position_ids" not in plain and torch.equal(cut["input_ids"], plain["input_ids"])
    for b, (item, r) in enumerate(zip(items, remove.tolist())):
        cot_len = item.s2 - item.s1 - 1
        removed = r if r < cot_len else cot_len + 1  # the whole CoT takes the second <sep> with it
        n = int(cut["attention_mask"][b].sum())
        assert cut["position_ids"][b, :n].tolist() == original_kept_positions(len(item.ids), item.s1, removed, n)
    # Every token after <sep> keeps the position it had in the uncut row.
    n = int(cut["attention_mask"][1].sum())
    after = cut["position_ids"][1, items[1].s1 + 1: n]
    assert cut["input_ids"][1, items[1].s1 + 1: n].tolist() == [items[1].ids[p] for p in after.tolist()]


def test_keep_position_stage_saves_its_shift_and_answers_with_it(si_config, tmp_path):
    config = dataclasses.replace(si_config, si=dataclasses.replace(si_config.si, keep_position=True))
    stage = stages.build("stepwise", config)
    fed = []
    forward = stage.module.forward

    def spy(*args, **kwargs):
        if stage.module.training:
            fed.append(kwargs["position_ids"])
        return forward(*args, **kwargs)

    stage.module.forward = spy
    train_stage(stage, config.stepwise, tmp_path / "si", config, progress=False)
    assert fed and all(p is not None for p in fed)
    assert read_meta(model_path(tmp_path / "si"))["position_shift"] == stage.max_cot + 1
    predictor = load_predictor(str(tmp_path / "si"))
    assert predictor.position_shift == stage.max_cot + 1
    assert len(predictor.predict([ex.input for ex in stage.valid[:3]])) == 3


def test_keep_position_needs_one_cot_length(si_config, tmp_path):
    lines = generate_examples(2, 2, 200, seed=5) + generate_examples(2, 3, 200, seed=6)
    train = tmp_path / "mixed.txt"
    train.write_text("".join(line + "\n" for line in lines))
    config = with_schedule(dataclasses.replace(si_config, data=dataclasses.replace(si_config.data, train=str(train))),
                           keep_position=True)
    with pytest.raises(ConfigError, match="one length"):
        stages.build("stepwise", config)


def _passing_gate(stage):
    """Report every validation with CoT left as passing the gate (a tiny model answers nothing right)."""
    validate = stage.validate
    stage.validate = lambda module: {**(m := validate(module)), "accuracy": 1.0 - m["eligible"]}
    return stage


def gated(config, **si):
    """``config`` with the gate of ``si.advance_at`` on: one token every 4 steps at the slowest."""
    return with_schedule(config, steps_per_epoch=8, remove_per_epoch=2, advance_at=0.9, **si)


def test_gate_removes_the_next_token_at_a_good_validation(si_config):
    stage = stages.build("stepwise", gated(si_config))
    assert stage.increments == [4, 8, 12, 16, 20, 24, 28, 32]  # the fixed schedule until a validation passes
    stage.after_validation(2, {"accuracy": 0.5})
    assert stage.increments[0] == 4  # below the gate: nothing moves
    stage.after_validation(2, {"accuracy": 0.95})
    # The next token goes at step 2, the later ones keep the pace of 4 from there.
    assert stage.increments == [2, 6, 10, 14, 18, 22, 26, 30]
    assert [stage.removal_at(s) for s in range(8)] == [0, 0, 1, 1, 1, 1, 2, 2]
    assert [s for s in range(12) if stage.begin_step(s)] == [2, 6, 10]  # the optimizer resets follow
    stage.after_validation(7, {"accuracy": 1.0})  # one token removed since step 6
    assert stage.increments[:3] == [2, 6, 7] and stage.cot_gone_at() == 27


def test_gate_waits_min_steps_and_stops_once_the_cot_is_gone(si_config):
    stage = stages.build("stepwise", gated(si_config, min_steps_per_token=3))
    stage.after_validation(2, {"accuracy": 1.0})
    assert stage.increments[0] == 4  # 2 steps since the start < 3
    stage.after_validation(3, {"accuracy": 1.0})
    assert stage.increments[:2] == [3, 7]
    stage.after_validation(5, {"accuracy": 1.0})  # token 1 started at step 3: 2 steps < 3
    assert stage.increments[1] == 7
    gone = list(stage.increments)
    stage.after_validation(40, {"accuracy": 1.0})  # the whole CoT went at step 31: nothing left to gate
    assert stage.increments == gone


def test_gate_off_keeps_the_fixed_schedule(si_config):
    stage = stages.build("stepwise", with_schedule(si_config, steps_per_epoch=8, remove_per_epoch=2))
    stage.after_validation(2, {"accuracy": 1.0})
    assert stage.increments == [4, 8, 12, 16, 20, 24, 28, 32]


def test_gate_needs_validations(si_config):
    config = gated(si_config)
    config = dataclasses.replace(config, stepwise=dataclasses.replace(config.stepwise, eval_every=0))
    with pytest.raises(ConfigError, match="si.advance_at"):
        stages.build("stepwise", config)


def test_gate_state_round_trips(si_config):
    stage = stages.build("stepwise", gated(si_config))
    stage.after_validation(2, {"accuracy": 1.0})
    fresh = stages.build("stepwise", gated(si_config))
    fresh.restore_decisions(json.loads(json.dumps(stage.decisions())))
    assert fresh.increments == stage.increments and fresh.reset_steps == stage.reset_steps
    assert [fresh.removal_at(s) for s in range(40)] == [stage.removal_at(s) for s in range(40)]


def test_gated_training_removes_sooner_and_logs_it(si_config, tmp_path):
    config = with_schedule(si_config, steps_per_epoch=24, remove_per_epoch=2, advance_at=0.5)
    config = dataclasses.replace(config, stepwise=dataclasses.replace(config.stepwise, max_steps=97, log_every=1))
    stage = stages.build("stepwise", config)
    assert stage.increments[0] == 12 and stage.cot_gone_at() == 96
    _passing_gate(stage)  # each validation (every 5 steps) removes the next token
    train_stage(stage, config.stepwise, tmp_path / "si", config, progress=False)
    events = [json.loads(line) for line in (tmp_path / "si" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "optimizer_reset"] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert stage.cot_gone_at() == 40
    removed = {e["step"]: e["cot_removed"] for e in events if e["event"] == "train"}
    assert removed[12] == 2 and removed[41] == stage.max_cot  # the train log of step s reports step s - 1


def _interrupt_at_step_17(stage, config, out):
    """Train ``stage`` into ``out`` until a SIGINT during step 17: the checkpoint is at step 17."""
    signal_at_call(stage, 17)
    with pytest.raises(TrainingInterrupted):
        train_stage(stage, config.stepwise, out, config, progress=False)


def test_resume_keeps_the_gates_decisions(si_config, tmp_path):
    config = with_schedule(si_config, steps_per_epoch=24, remove_per_epoch=2, advance_at=0.5)
    config = dataclasses.replace(config, stepwise=dataclasses.replace(config.stepwise, max_steps=97, save_every=0))
    torch.manual_seed(0)
    reference = _passing_gate(stages.build("stepwise", config))
    train_stage(reference, config.stepwise, tmp_path / "ref", config, progress=False)

    torch.manual_seed(0)
    stage = _passing_gate(stages.build("stepwise", config))
    _interrupt_at_step_17(stage, config, tmp_path / "run")
    torch.manual_seed(0)
    resumed = _passing_gate(stages.build("stepwise", config))
    assert resumed.increments[0] == 12  # a new stage knows only the fixed schedule: the checkpoint has the rest
    train_stage(resumed, config.stepwise, tmp_path / "run", config, progress=False, resume=True)
    assert resumed.increments == reference.increments and resumed.cot_gone_at() == 40
    resets = [[json.loads(x)["step"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
               if json.loads(x)["event"] == "optimizer_reset"] for d in ("ref", "run")]
    assert resets[0] == resets[1] == [5, 10, 15, 20, 25, 30, 35, 40]
    for name, weight in resumed.module.state_dict().items():
        assert torch.allclose(weight, reference.module.state_dict()[name], atol=1e-5), name


def test_resumed_gated_run_is_held_to_the_gates_removals_not_the_fixed_pace(si_config, tmp_path):
    # Fixed pace: one token every 12 steps, gone at step 96. Every validation (each 5 steps) passes the gate.
    config = with_schedule(si_config, steps_per_epoch=24, remove_per_epoch=2, advance_at=0.5)
    config = dataclasses.replace(config, stepwise=dataclasses.replace(config.stepwise, max_steps=97, save_every=0))
    stage = _passing_gate(stages.build("stepwise", config))
    _interrupt_at_step_17(stage, config, tmp_path / "run")
    # The checkpoint (step 17) holds the gate's removals at steps 5, 10, 15: the rest follow every 12 steps.
    assert stage.increments == [5, 10, 15, 27, 39, 51, 63, 75]

    short, enough = (dataclasses.replace(config, stepwise=dataclasses.replace(config.stepwise, max_steps=n))
                     for n in (75, 80))
    with pytest.raises(ConfigError, match="gone at step 96"):  # a fresh run knows only the fixed pace
        stages.build("stepwise", enough).check_budget()
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="gone at step 75"):
        train_stage(_passing_gate(stages.build("stepwise", short)), short.stepwise, tmp_path / "run", short,
                    progress=False, resume=True)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics  # the refusal left the run as it was
    resumed = _passing_gate(stages.build("stepwise", enough))
    result = train_stage(resumed, enough.stepwise, tmp_path / "run", enough, progress=False, resume=True)
    assert result["steps"] == 80 and resumed.cot_gone_at() == 40
