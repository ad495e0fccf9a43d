"""The student's text side as a sentence-transformers model: loaded with sentence-transformers alone (installed
here), `encode` gives kdpipe's normalized text embeddings, projection bias included, for every text pooling."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from deploy_helpers import DIM, tiny_student, tiny_student_config

from pipeline.deploy.sentence import save_sentence_transformer
from pipeline.errors import InputError
from pipeline.towers.student import build_student, save_student

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["A dog runs", "the cat sits on a man in red", "photo", "dog " * 30]


@pytest.mark.parametrize("pooling", ["mean", "cls", "pooler"])
def test_sentence_transformers_gives_kdpipe_text_embeddings(tokenizer_dir, tmp_path, pooling):
    model = tiny_student(tokenizer_dir, seed=4, biases=("text",), pooling=pooling)  # DSMD's layout: a text bias
    save_student(model, tmp_path / "student")
    save_sentence_transformer(model, tmp_path / "st", tmp_path / "student" / "text_tower")
    from sentence_transformers import SentenceTransformer  # sentence-transformers alone from here on

    st = SentenceTransformer(str(tmp_path / "st"), device="cpu", local_files_only=True)
    theirs = st.encode(TEXTS, convert_to_tensor=True)
    with torch.no_grad():
        torch.testing.assert_close(theirs, model.encode_texts(TEXTS), rtol=0, atol=1e-5)
    assert st.max_seq_length == 12  # long captions are cut where the student cuts them


def test_a_pooler_sentence_transformers_has_no_module_for_is_refused(tokenizer_dir, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    CLIPTextModel(
        CLIPTextConfig(vocab_size=20, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                       num_hidden_layers=1, max_position_embeddings=16, eos_token_id=3, pad_token_id=0)
    ).save_pretrained(tmp_path / "clip_text")  # fmt: skip
    cfg = tiny_student_config(tokenizer_dir, pooling="pooler")
    model = build_student(replace(cfg, text=replace(cfg.text, path=tmp_path / "clip_text")), DIM).eval()
    save_student(model, tmp_path / "student")
    with pytest.raises(InputError, match="clip_text_model model is not BERT's dense"):
        save_sentence_transformer(model, tmp_path / "st", tmp_path / "student" / "text_tower")
    assert not (tmp_path / "st").exists()
