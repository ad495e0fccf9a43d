"""The student's logit scale: what the exported dual encoders multiply cosine similarities by before a softmax.

A CLIP-style model's zero-shot probabilities are softmax(scale * cos). kdpipe's students train with fixed
temperatures (no learned scale), so the scale to write is 1 / T of the loss term that compares the student's own
images with texts, read from the run's resolved config (`distill_config.yaml`, and `train_summary.json` for
whether it was the baseline): `pair_contrastive` (s_v . s_t / T), else `relation` (the same logits matched to the
teacher's), else the contrastive distillation term (the student against teacher rows, which it learns to
approximate, at T). A recipe with none of them (L1, cosine, triplet only) has no temperature: CLIP's initial
1 / 0.07 is written and said.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.errors import InputError

CLIP_INIT_TEMPERATURE = 0.07  # CLIP's (and open_clip's) initial logit scale is ln(1 / 0.07)
# (loss weight key, temperature key, what it is), in order of preference
_TERMS = (
    ("pair_contrastive", "pair_temperature", "the student's image-text contrastive loss"),
    ("relation", "relation_temperature", "relation distillation"),
    ("contrastive", "temperature", "contrastive distillation"),
)


@dataclass(frozen=True)
class LogitScale:
    temperature: float
    source: str  # which loss term's temperature, for the model card

    @property
    def log_scale(self) -> float:
        """ln(1 / T): what CLIP-style configs store (`logit_scale_init_value`, open_clip's `logit_scale`)."""
        return math.log(1.0 / self.temperature)


def training_logit_scale(student_dir: Path) -> LogitScale:
    """The logit scale of the run that trained `student_dir` (see the module docstring)."""
    config_path, summary_path = student_dir / "distill_config.yaml", student_dir / "train_summary.json"
    for path in (config_path, summary_path):
        if not path.is_file():
            raise InputError(
                f"{path} missing, so the training temperature (the exported logit scale) is unknown; export a "
                "student directory of a `kdpipe distill` run that finished"
            )
    try:
        distill = (yaml.safe_load(config_path.read_text()) or {}).get("distill") or {}
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise InputError(f"{student_dir}: cannot read the run's config and summary ({err})") from None
    loss = distill.get("baseline_loss" if summary.get("baseline") else "loss") or {}
    for weight, temperature, what in _TERMS:
        if float(loss.get(weight, 0.0)) > 0:
            return LogitScale(float(loss[temperature]), f"{what} ({temperature} = {loss[temperature]})")
    return LogitScale(CLIP_INIT_TEMPERATURE, "no loss term with a temperature: CLIP's initial 1 / 0.07")
