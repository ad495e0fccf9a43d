"""The student's text side as a sentence-transformers model (`SentenceTransformer(DIR).encode(texts)` gives
kdpipe's normalized text embeddings; sentence-transformers has no image side for these towers).

The layout, built from sentence-transformers' own modules and saved with its own `save`:
    Transformer (the text tower, max_seq_length = max_tokens)
    -> Pooling (`mean` or `cls`: the student's pooling; for `pooler`, `cls` ...
    -> Dense (... then BERT's pooler itself: dense + tanh, hidden -> hidden, with its bias)
    -> Dense (the student's projection, with its bias if it has one, no activation)
    -> Normalize
Every step is the student's own math, so the text projection's bias, which transformers' dual encoder cannot
hold, is exact here. `pooler` pooling is refused for text models whose pooler is not BERT's dense + tanh on
the first token.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.errors import InputError
from pipeline.store.durable import atomic_dir
from pipeline.store.ownership import Output
from pipeline.towers import quiet_transformers
from pipeline.towers.student import DualEncoderStudent


def _bert_pooler(model: DualEncoderStudent) -> nn.Linear:
    """The text model's pooler dense layer when it is BERT's (dense + tanh on the first token), else one line."""
    pooler = getattr(model.text_tower.model, "pooler", None)
    dense, act = getattr(pooler, "dense", None), getattr(pooler, "activation", None)
    if not isinstance(dense, nn.Linear) or not isinstance(act, nn.Tanh):
        kind = getattr(model.text_tower.model.config, "model_type", "?")
        raise InputError(
            f"export --sentence-transformers: text pooling `pooler` of a {kind} model is not BERT's dense + "
            "tanh on the first token; sentence-transformers has no module for it"
        )
    return dense


def _dense(linear: nn.Linear, activation: nn.Module):
    from sentence_transformers.sentence_transformer.modules import Dense

    w = linear.weight.detach().float()
    b = linear.bias.detach().float() if linear.bias is not None else None
    return Dense(
        w.shape[1],
        w.shape[0],
        bias=b is not None,
        activation_function=activation,
        init_weight=w.clone(),
        init_bias=b.clone() if b is not None else None,
    )


# what save_sentence_transformer replaces: a directory it wrote (it lists its files, pipeline/store/ownership.py)
SENTENCE_DIR = Output("a sentence-transformers copy of a student", directory=True, marker=True)


def save_sentence_transformer(model: DualEncoderStudent, directory: Path, text_tower_dir: Path) -> Path:
    """Write the text side into `directory`; `text_tower_dir`: the student's saved text tower (its weights and
    tokenizer, as `save_student` wrote them)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    model = getattr(model, "_orig_mod", model)
    pooling = model.config.text.pooling
    head = [_dense(_bert_pooler(model), nn.Tanh())] if pooling == "pooler" else []  # refuses first
    width = model.text_tower.out_dim
    with quiet_transformers():  # its AutoModel reports the pooler the tower deliberately left out (not used)
        transformer = Transformer(str(text_tower_dir), max_seq_length=model.text_tower.max_tokens)
    modules = [
        transformer,
        Pooling(width, pooling_mode="cls" if pooling == "pooler" else pooling),
        *head,
        _dense(model.text_proj, nn.Identity()),
        Normalize(),
    ]
    st = SentenceTransformer(modules=modules, device="cpu")
    with atomic_dir(directory, SENTENCE_DIR) as tmp, quiet_transformers():
        st.save(str(tmp))
    return Path(directory)


@torch.inference_mode()
def max_error(model: DualEncoderStudent, directory: Path, texts: list[str]) -> float:
    """Largest |sentence-transformers - kdpipe| over the embeddings of `texts`, the saved directory reloaded."""
    from sentence_transformers import SentenceTransformer

    with quiet_transformers():
        st = SentenceTransformer(str(directory), device="cpu", local_files_only=True)
    theirs = st.encode(texts, convert_to_tensor=True).float().cpu()
    return float((theirs - model.encode_texts(texts).cpu()).abs().max())
