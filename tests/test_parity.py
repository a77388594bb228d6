"""softkd's loop and the ~60-line plain-PyTorch loop give the same student after N steps."""

import copy

import pytest
import torch

import softkd
from softkd.losses import UNLABELED
from softkd.models import build_model


@pytest.mark.parametrize("student_name", ["mlp-16", "tinycnn-4"])
@pytest.mark.parametrize("labeled_every", [1, 3])
def test_distill_matches_plain_loop(digit_splits, trained_teacher, plain_example, student_name, labeled_every):
    x, y = digit_splits.train.x[:500], digit_splits.train.y[:500].clone()
    y[torch.arange(len(y)) % labeled_every != 0] = UNLABELED  # mix labeled and unlabeled samples
    torch.manual_seed(7)
    student = build_model(student_name, input_shape=(1, 8, 8), num_classes=10)
    reference = copy.deepcopy(student)
    initial = copy.deepcopy(student.state_dict())
    hparams = dict(temperature=3.0, beta=0.7, epochs=3, batch_size=64, lr=3e-3, weight_decay=1e-2, seed=5)

    steps = softkd.distill(student, trained_teacher, softkd.ArrayDataset(x, y), **hparams).steps
    plain_example.distill_plain(reference, trained_teacher, x, y, **hparams)

    assert steps == 3 * -(-500 // 64)  # three epochs of 8 batches, the last one short
    for (name, a), b in zip(student.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} differs after {steps} steps")
    moved = max((a - b).abs().max() for a, b in zip(student.state_dict().values(), initial.values())
                if a.is_floating_point())
    assert moved > 1e-3  # the comparison is not vacuous: training moved the weights


def test_plain_loop_with_precomputed_logits_matches_softkd(digit_splits, trained_teacher, plain_example):
    x, y = digit_splits.train.x[:300], digit_splits.train.y[:300]
    with torch.no_grad():
        logits = trained_teacher(x)
    torch.manual_seed(3)
    student = build_model("mlp-16", input_shape=(1, 8, 8), num_classes=10)
    reference = copy.deepcopy(student)
    hparams = dict(epochs=2, batch_size=64, lr=3e-3, seed=1)
    softkd.distill(student, None, softkd.ArrayDataset(x, y), teacher_logits=logits, **hparams)
    plain_example.distill_plain(reference, trained_teacher, x, y, teacher_logits=logits, **hparams)
    for a, b in zip(student.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
