"""The fusion loss against its formula computed by hand, the fusion finetuner's registration, and the core's
extension it runs on (extra per-token fields through packing and collation, the finetuner's own loss)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergeplug import MergeplugError
from mergeplug.finetuning import IGNORE_INDEX, Collator, Finetuner, finetune, finetune_examples, pack_examples
from mergeplug.fusion import TARGET_IDS, TARGET_LOGPROBS, fusion_loss
from mergeplug.plugins import Registry

NEG = float("-inf")
# One sequence of 3 tokens over a vocabulary of 3. Logits at positions 0 and 1 predict tokens 1 and 2.
LOGITS = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 0.0, math.log(2.0)], [5.0, 5.0, 5.0]]])
LABELS = torch.tensor([[IGNORE_INDEX, 1, 2]])
# Targets ride with the labels: row j is the target of token j. Token 1: ids {1, 0} with probabilities 3:1 once
# renormalised (from log .3, log .1); token 2: the single id 2.
TARGET_ID = torch.tensor([[[-1, -1], [1, 0], [2, -1]]])
TARGET_LP = torch.tensor([[[0.0, 0.0], [math.log(.3), math.log(.1)], [math.log(.5), 0.0]]])


def by_hand(lm_weight: float, temperature: float = 1.0) -> tuple[float, float]:
    """(L_LM summed, L_fusion summed) over the two label positions."""
    z0 = math.log(math.e ** 1 + math.e ** 2 + 1)
    logp0 = [1 - z0, 2 - z0, 0 - z0]
    z1 = math.log(1 + 1 + 2)
    logp1 = [-z1, -z1, math.log(2) - z1]
    lm = -(logp0[1] + logp1[2])
    a, b = .3 ** (1 / temperature), .1 ** (1 / temperature)
    q1, q0 = a / (a + b), b / (a + b)
    fusion = -(q1 * logp0[1] + q0 * logp0[0]) - logp1[2]
    return lm, fusion


def test_the_fusion_loss_is_its_formula_on_a_tiny_batch():
    lm, fused = by_hand(0.9)
    got = fusion_loss(LOGITS, LABELS, TARGET_ID, TARGET_LP, lm_weight=0.9)
    assert float(got) == pytest.approx((0.9 * lm + 0.1 * fused) / 2, rel=1e-6)
    assert float(fusion_loss(LOGITS, LABELS, TARGET_ID, TARGET_LP, lm_weight=1.0)) == pytest.approx(lm / 2, rel=1e-6)
    assert float(fusion_loss(LOGITS, LABELS, TARGET_ID, TARGET_LP, lm_weight=0.0)) == pytest.approx(fused / 2, rel=1e-6)


def test_temperature_and_the_accumulated_count():
    lm, fused = by_hand(0.5, temperature=2.0)
    got = fusion_loss(LOGITS, LABELS, TARGET_ID, TARGET_LP, lm_weight=0.5, temperature=2.0, num_items_in_batch=8)
    assert float(got) == pytest.approx((0.5 * lm + 0.5 * fused) / 8, rel=1e-6)


def test_a_position_without_a_target_adds_no_fusion_loss():
    lm, _ = by_hand(0.0)
    empty = torch.full_like(TARGET_ID, -1)
    assert float(fusion_loss(LOGITS, LABELS, empty, TARGET_LP, lm_weight=0.0)) == 0.0
    only_second = TARGET_ID.clone()
    only_second[0, 1] = -1
    z1 = math.log(4)
    assert float(fusion_loss(LOGITS, LABELS, only_second, TARGET_LP, lm_weight=0.0)) == pytest.approx(
        (z1 - math.log(2)) / 2, rel=1e-6)


def test_with_lm_weight_one_it_is_the_models_own_loss(models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(models.pivot)).eval()
    ids = torch.tensor([[2, 10, 11, 12, 13, 14], [2, 20, 21, 22, 1, 1]])
    labels = ids.masked_fill(ids == 1, IGNORE_INDEX)
    labels[:, 0] = IGNORE_INDEX
    with torch.no_grad():
        output = model(input_ids=ids, labels=labels)
    targets = torch.full((2, 6, 3), -1)
    ours = fusion_loss(output.logits, labels, targets, torch.zeros(2, 6, 3), lm_weight=1.0)
    torch.testing.assert_close(ours, output.loss, rtol=1e-5, atol=1e-6)


def test_the_fusion_finetuner_is_registered_with_its_fields():
    cls = Registry().get("finetuner", "fusion").load()
    assert issubclass(cls, Finetuner) and cls.__name__ == "FusionFinetuner"
    assert cls.EXTRA_FIELDS == {TARGET_IDS: -1, TARGET_LOGPROBS: 0.0}
    component = Registry().get("finetuner", "fusion")
    assert component.reference == "arXiv:2402.16107"
    assert component.parameters["properties"]["lm_loss_weight"]["default"] == 0.9


def test_its_compute_loss_pops_the_targets_and_calls_the_model():
    cls = Registry().get("finetuner", "fusion").load()
    seen = {}

    class Stub:
        def __call__(self, **kwargs):
            seen.update(kwargs)
            return type("Out", (), {"logits": LOGITS})()

    inputs = {"input_ids": torch.tensor([[0, 1, 2]]), "position_ids": torch.tensor([[0, 1, 2]]), "labels": LABELS,
              TARGET_IDS: TARGET_ID, TARGET_LOGPROBS: TARGET_LP}
    loss = cls(lm_loss_weight=0.9, temperature=1.0).compute_loss(Stub(), inputs, num_items_in_batch=None)
    assert sorted(seen) == ["input_ids", "position_ids"]
    lm, fused = by_hand(0.9)
    assert float(loss) == pytest.approx((0.9 * lm + 0.1 * fused) / 2, rel=1e-6)


def test_extra_fields_are_packed_and_padded_like_the_labels():
    a = {"input_ids": [5, 6], "labels": [IGNORE_INDEX, 6], "t": np.array([[-1, -1], [3, 4]]),
         "w": np.array([[0.0, 0.0], [0.5, 0.25]])}
    b = {"input_ids": [7, 8, 9], "labels": [IGNORE_INDEX, 8, 9], "t": np.array([[-1, -1], [1, 2], [9, -1]]),
         "w": np.array([[0.0, 0.0], [1.0, 2.0], [3.0, 0.0]])}
    packed = pack_examples([a, b], 5)
    assert len(packed) == 1 and packed[0]["position_ids"] == [0, 1, 0, 1, 2]
    assert packed[0]["t"].tolist() == [[-1, -1], [3, 4], [-1, -1], [1, 2], [9, -1]]
    assert pack_examples([a, b], 4)[1]["t"].tolist() == b["t"].tolist()  # b starts the next sequence
    batch = Collator(1, {"t": -1, "w": 0.0})([a, b])
    assert batch["t"].dtype == torch.int64 and batch["w"].dtype == torch.float32
    assert batch["t"].tolist() == [[[-1, -1], [3, 4], [-1, -1]], [[-1, -1], [1, 2], [9, -1]]]
    assert batch["w"][0].tolist() == [[0.0, 0.0], [0.5, 0.25], [0.0, 0.0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, IGNORE_INDEX], [IGNORE_INDEX, 8, 9]]
    assert "t" not in Collator(1)([a, b])  # undeclared fields are not collated


def test_a_finetuner_with_extra_fields_refuses_domain_rows(models, tmp_path):
    with pytest.raises(MergeplugError, match="finetuner fusion: trains on per-token targets"):
        finetune(str(models.pivot), "math", tmp_path / "out", finetuner="fusion", progress=False)


def test_examples_without_the_declared_fields_are_refused(models, tmp_path):
    with pytest.raises(MergeplugError, match="training example 0: has no 'fusion_ids'"):
        finetune_examples(str(models.pivot), [{"input_ids": [2, 5], "labels": [IGNORE_INDEX, 5]}], tmp_path / "o",
                          finetuner="fusion", progress=False)
    bad = {"input_ids": [2, 5], "labels": [IGNORE_INDEX, 5], TARGET_IDS: np.zeros((3, 2)),
           TARGET_LOGPROBS: np.zeros((2, 2))}
    with pytest.raises(MergeplugError, match="'fusion_ids' has 3 rows for 2 input_ids"):
        finetune_examples(str(models.pivot), [bad], tmp_path / "o", finetuner="fusion", progress=False)


def test_finetune_examples_trains_towards_the_targets(models, tmp_path):
    """Targets that put all their mass on token 7 after every token: with λ = 0 the model learns to predict it."""
    from transformers import AutoModelForCausalLM

    ids = [[2, 10, 11, 12, 13, 14, 15], [2, 20, 21, 22, 23]]
    examples = []
    for row in ids:
        targets = np.full((len(row), 1), 7)
        targets[0] = -1
        examples.append({"input_ids": row, "labels": [IGNORE_INDEX] + row[1:], TARGET_IDS: targets,
                         TARGET_LOGPROBS: np.zeros((len(row), 1), np.float32)})
    parameters = {"lm_loss_weight": 0.0, "learning_rate": 3e-2, "max_steps": 12, "warmup_ratio": 0.0,
                  "per_device_batch_size": 2, "gradient_accumulation_steps": 1, "max_seq_length": 16,
                  "save_steps": 100}
    out = finetune_examples(str(models.pivot), examples, tmp_path / "fused", finetuner="fusion",
                            parameters=parameters, origin={"test": 1}, progress=False, device="cpu")

    def p7(folder):
        model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        with torch.no_grad():
            return torch.softmax(model(input_ids=torch.tensor([ids[0]])).logits[0, :-1], -1)[:, 7].mean().item()

    assert p7(models.pivot) < 0.1 < 0.9 < p7(out)
    assert (out / "mergeplug_finetune.json").is_file() and (out / "tokenizer.json").is_file()
