"""The teacher interface: what the extract stage needs from any frozen image-text encoder.

A teacher turns images and captions into L2-normalized float32 vectors of one dimension `dim`. The work
is split so that the extract stage can overlap CPU and GPU work: `preprocess_image` and `tokenize` run on
the CPU in loader workers (they must not touch the model), `encode_image_batch` / `encode_text_batch`
run on the teacher's device. `encode_images` / `encode_texts` are the convenient one-call API.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from PIL import Image

from pipeline.data.image_file import to_rgb

TokenBatch = dict[str, torch.Tensor]  # e.g. {"input_ids": [B, L] int64, "padding_mask": [B, L] bool}


class Teacher(ABC):
    name: str  # short identifier recorded in the feature store, e.g. "beit3-large-384"
    dim: int  # embedding dimension D
    device: torch.device

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """JSON-serializable description recorded in the store attrs (`teacher`); two teachers whose
        identities are equal must compute the same features. Include name, dims or preset, checkpoint
        file name and sha256, image size, max text length and compute dtype."""

    @abstractmethod
    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """One RGB PIL image -> float32 [3, S, S] on the CPU, normalized as the teacher expects."""

    @abstractmethod
    def tokenize(self, texts: list[str]) -> TokenBatch:
        """Captions -> tensors on the CPU, padded to the longest caption of the batch (padding is masked,
        so the features do not depend on how much padding a batch has)."""

    def token_lengths(self, texts: list[str]) -> list[int]:
        """Number of tokens of each caption after truncation (used to bucket captions by length)."""
        batch = self.tokenize(texts)
        mask = batch.get("padding_mask")
        if mask is not None:
            return (~mask).sum(1).tolist()
        return batch["attention_mask"].sum(1).tolist()

    @abstractmethod
    def encode_image_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] on the teacher's device -> [B, D] float32, L2-normalized rows."""

    @abstractmethod
    def encode_text_batch(self, tokens: TokenBatch) -> torch.Tensor:
        """A `tokenize` result (on any device) -> [B, D] float32, L2-normalized rows."""

    def logit_scale(self) -> float | None:
        """tau = exp(the learned log scale): the factor the teacher's contrastive training put on its cosine
        similarities (CLIP's `logit_scale.exp()`), so that softmax(tau s_v . s_t) is its own distribution.
        Recorded in the feature store as `teacher.logit_scale` (`teacher_record`); None: the teacher has none."""
        return None

    # -- convenience ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """PIL images -> [N, D] float32 on the CPU, L2-normalized, with the teacher's own preprocessing."""
        out = []
        for i in range(0, len(images), batch_size):
            pixels = torch.stack([self.preprocess_image(to_rgb(im)) for im in images[i : i + batch_size]])
            out.append(self.encode_image_batch(pixels.to(self.device)).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.dim)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Captions -> [N, D] float32 on the CPU, L2-normalized, with the teacher's own tokenizer."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = {k: v.to(self.device) for k, v in self.tokenize(texts[i : i + batch_size]).items()}
            out.append(self.encode_text_batch(tokens).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.dim)


def teacher_record(teacher: Teacher) -> dict[str, Any]:
    """What a feature store records of its teacher (attrs `teacher`): its identity and its logit scale, as
    `logit_scale`, a float or None (a kind that already names one in its identity keeps its own)."""
    scale = teacher.logit_scale()
    return {"logit_scale": None if scale is None else float(scale), **teacher.identity()}


class CrossEncoder(ABC):
    """A teacher that scores (image, caption) PAIRS jointly (a single-stream / fusion model: an image-text
    matching head), where a `Teacher` embeds each side alone. `kdpipe mine` runs one over each caption's
    positive and mined images and each image's mined captions.

    The work is split so that a pair costs only what is joint: `image_states` (per image: e.g. a vision
    encoder's token states) and `text_states` (per caption: e.g. its token ids, or a sentence embedding) run
    once per item, `score_states` once per pair on rows gathered from them. A state is a tensor whose first
    axis is the item, the same shape for every item (so states of several batches stack); `image_state_bytes`
    / `text_state_bytes` give one item's size, which decides whether a split's states are kept for the run."""

    name: str
    device: torch.device

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """JSON-serializable description recorded in the mined store (`cross_encoder`)."""

    @abstractmethod
    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """One RGB PIL image -> float32 [3, S, S] on the CPU (runs in loader workers)."""

    @abstractmethod
    def tokenize(self, texts: list[str]) -> TokenBatch:
        """Captions -> tensors on the CPU."""

    @abstractmethod
    def image_states(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] on the device -> [B, ...] per-image states."""

    @abstractmethod
    def text_states(self, tokens: TokenBatch) -> torch.Tensor:
        """A `tokenize` result -> [B, ...] per-caption states on the device."""

    @abstractmethod
    def score_states(self, image_states: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        """[P, ...] image states and [P, ...] text states, row p one pair -> [P] float32 logits that the pair
        matches (higher: more likely)."""

    @abstractmethod
    def image_state_bytes(self) -> int:
        """Bytes of one image's state."""

    @abstractmethod
    def text_state_bytes(self) -> int:
        """Bytes of one caption's state."""

    @torch.inference_mode()
    def score_pairs(self, pixels: torch.Tensor, tokens: TokenBatch) -> torch.Tensor:
        """The one-call API: [P, 3, S, S] pixels and the P captions' tokens, row p one pair -> [P] float32."""
        return self.score_states(self.image_states(pixels.to(self.device)), self.text_states(tokens))
