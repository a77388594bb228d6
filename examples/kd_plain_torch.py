"""Soft-target distillation in ~60 lines of plain PyTorch: the reference softkd's loop is tested
against (tests/test_parity.py) and benchmarked against (benchmarks/).

    python examples/kd_plain_torch.py      # digits: teacher, then a distilled 16-unit MLP
"""

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(student_logits, teacher_logits, labels, temperature, beta):
    """(1 - beta) * CE over labeled samples (label -1 = none) + beta * T^2 * KL(teacher || student)."""
    t = temperature
    kd = F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                  reduction="batchmean", log_target=True) * t * t
    labeled = labels >= 0
    ce = F.cross_entropy(student_logits[labeled], labels[labeled]) if labeled.any() else 0.0
    return (1 - beta) * ce + beta * kd


def distill_plain(student, teacher, x, y, *, temperature=4.0, beta=0.9, epochs=15, batch_size=256,
                  lr=2e-3, weight_decay=5e-4, seed=0, teacher_logits=None):
    """teacher_logits: the teacher's outputs on x, computed once, instead of running it every step."""
    teacher.eval()
    torch.manual_seed(seed)
    decay = [p for p in student.parameters() if p.ndim >= 2]  # no decay on biases and norms
    rest = [p for p in student.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=lr)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        student.train()
        for idx in torch.randperm(len(x), generator=order).split(batch_size):
            if teacher_logits is None:
                with torch.no_grad():
                    t = teacher(x[idx])
            else:
                t = teacher_logits[idx]
            loss = kd_loss(student(x[idx]), t, y[idx], temperature, beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return student.eval()


def mlp(hidden, n_in=64, n_out=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


if __name__ == "__main__":
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]
    torch.manual_seed(0)
    teacher = mlp(512)  # trained with CE only: beta=1 on its own logits would be a no-op
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-3)
    for _ in range(30):
        for idx in torch.randperm(len(x_train)).split(64):
            loss = F.cross_entropy(teacher(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    student = distill_plain(mlp(16), teacher, x_train, y_train, epochs=40, batch_size=64, lr=3e-3)
    for name, model in (("teacher", teacher.eval()), ("student", student)):
        with torch.no_grad():
            print(name, f"test accuracy {(model(x_test).argmax(1) == y_test).float().mean():.3f}")
