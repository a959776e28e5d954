"""Knowledge distillation: a small student learns from a trained teacher's softened outputs.

Loss = α·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − α)·CE(student, labels)
(Hinton et al., 2015; the T² keeps the soft term's gradients on the hard term's scale).
Validation and test score the student alone, with its own task metrics, so a distilled
student and the same student trained from scratch are compared on identical numbers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.tasks import SPLITS, SupervisedModule, _log_split


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """Works for any logits shape (..., classes): per example (classifiers) or per token (gpt)."""
    classes = student.shape[-1]
    s, t = student.reshape(-1, classes), teacher.reshape(-1, classes)
    log_student, log_teacher = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    soft = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    hard = F.cross_entropy(s, target.reshape(-1))
    return alpha * temperature**2 * soft + (1 - alpha) * hard


class Distill(SupervisedModule):
    """Trains `student` (any supervised classifier-like module: MLP, CNN, gpt) against `teacher`.

    The student keeps its own optimizer settings, metrics and monitor; after fitting,
    `distill.student` is an ordinary module of its class, ready to save or measure.
    """

    def __init__(self, student: SupervisedModule, teacher: nn.Module, alpha: float = 0.5, temperature: float = 1.0):
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        super().__init__(**student.optim_settings, dropout=student.dropout)
        self.save_hyperparameters(ignore=["student", "teacher"])
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.task, self.monitor, self.metric_names = student.task, student.monitor, student.metric_names
        for split in SPLITS:  # the student's own metric objects, logged under the same names
            setattr(self, f"{split}_metrics", getattr(student, f"{split}_metrics"))
            setattr(self, f"{split}_mean_loss", getattr(student, f"{split}_mean_loss"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.student.loss(output, target)

    def metric_inputs(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.student.metric_inputs(output, target)

    def on_train_epoch_start(self) -> None:
        self.teacher.eval()  # Lightning puts every submodule in train mode; the teacher's dropout stays off

    def _step(self, batch: Any, split: str, batch_idx: int) -> torch.Tensor:
        if split != "train":
            return super()._step(batch, split, batch_idx)
        x, y = batch
        output = self(x)
        with torch.no_grad():
            teacher = self.teacher(x)
        loss = distillation_loss(output, teacher, y, self.hparams.alpha, self.hparams.temperature)
        self._update_metrics("train", loss.detach(), y.shape[0], self.metric_inputs(output, y))
        if batch_idx == 0:
            _log_split(self, "train")
        return loss
