"""Stepwise internalization (ICoT-SI): the removal schedule, the smoothing law, reset points, and the
fully internalized model that never sees or writes a CoT token."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from icot.evaluation import load_predictor
from icot.models.lm import read_meta
from icot.training import stages
from icot.training.causal_lm import lm_batch
from icot.training.loop import model_path, train_stage
from icot.training.stepwise import cut_encoded, removal_offsets, remove_cot_tokens


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
    si = dataclasses.replace(tiny_config.si, remove_per_epoch=3, steps_per_epoch=4, removal_smoothing_lambda=math.inf)
    return dataclasses.replace(tiny_config, stepwise=section, si=si)


def test_schedule_and_reset_points(si_config):
    stage = stages.build("stepwise", si_config)
    resets = [s for s in range(40) if stage.begin_step(s)]
    removed = [stage.removal_at(s) for s in range(40)]
    # 2x2 multiplication CoT: "P0 + P1" = 3 + 1 + 4 tokens.
    assert stage.max_cot == 8
    assert removed[:4] == [0] * 4 and removed[4:8] == [3] * 4 and removed[8:12] == [6] * 4
    assert all(r == 8 for r in removed[12:])  # 9 >= 8: everything goes
    assert resets == [4, 8, 12]


def test_remove_all_when_remove_beyond(si_config):
    config = dataclasses.replace(si_config, si=dataclasses.replace(si_config.si, remove_all_when_remove_beyond=2))
    stage = stages.build("stepwise", config)
    assert stage.removal_at(3) == 0 and stage.removal_at(4) == stage.max_cot


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
    assert [e["step"] for e in events if e["event"] == "optimizer_reset"] == [4, 8, 12]
    vals = [e for e in events if e["event"] == "validate"]
    assert [v["val_cot_removed"] for v in vals][:3] == [3.0, 6.0, 8.0]
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
