"""BEiT-3 tokenizer: fairseq ids of a tiny SentencePiece model trained here, against the model's own encode."""

from __future__ import annotations

import pytest
import sentencepiece as spm
import torch
from beit3_fixtures import *  # noqa: F401,F403  (fixtures)

from pipeline.errors import InputError
from pipeline.teachers.beit3_tokenizer import BOS, EOS, PAD, UNK, BEiT3Tokenizer

SENTENCES = [
    "A man riding a bike on the street.",
    "Two children sitting on a bench near the water!",
    "A black dog jumps over the grass",
    "Café naïve résumé, Über cool 123",
    "Snow 漢字 ẞ",  # characters the tiny model has never seen
]


def _fairseq(sp, text):
    """XLMRobertaTokenizer's mapping, stated independently: piece id k -> k + 1, spm <unk> (0) -> 3."""
    return [0] + [3 if i == sp.unk_id() else i + 1 for i in sp.encode(text)] + [2]


@pytest.fixture(scope="module")
def sp(tiny_spm):
    return spm.SentencePieceProcessor(model_file=str(tiny_spm))


def test_spm_layout_is_xlmr_like(sp):
    # ids 0/1/2 of the SentencePiece model itself are <unk>/<s>/</s>, which the fairseq mapping moves
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]


def test_ids_of_known_sentences(tiny_spm, sp):
    tok = BEiT3Tokenizer(tiny_spm)
    for text in SENTENCES:
        assert tok.encode(text) == _fairseq(sp, text), text
    # hand-checked pieces: a whole word of the corpus is one piece, shifted by one
    street = sp.piece_to_id("▁street")
    assert street not in (0, 1, 2)
    assert tok.encode("street") == [BOS, street + 1, EOS]
    assert (BOS, PAD, EOS, UNK) == (0, 1, 2, 3)
    assert tok.vocab_size == sp.get_piece_size() + 2  # + <pad> shift and <mask>, as 64000 -> 64002


def test_unknown_characters_map_to_fairseq_unk(tiny_spm, sp):
    tok = BEiT3Tokenizer(tiny_spm)
    assert 0 in sp.encode("漢字")
    ids = tok.encode("漢字")
    assert UNK in ids and 1 not in ids[1:-1] and min(ids[1:-1]) >= 3


def test_no_lowercasing(tiny_spm):
    tok = BEiT3Tokenizer(tiny_spm)
    assert tok.encode("Dog") != tok.encode("dog")


def test_truncation_keeps_bos_and_eos(tiny_spm, sp):
    tok = BEiT3Tokenizer(tiny_spm, max_len=8)
    text = "a man a woman a dog a cat riding a bike on the street with a red hat"
    pieces = _fairseq(sp, text)[1:-1]
    assert len(pieces) > 6
    assert tok.encode(text) == [BOS, *pieces[:6], EOS]
    assert tok.lengths([text, "dog"]) == [8, 3]


def test_batch_padding_to_longest_and_to_max_len(tiny_spm, sp):
    tok = BEiT3Tokenizer(tiny_spm, max_len=64)
    batch = tok(SENTENCES[:3])
    ids, mask = batch["input_ids"], batch["padding_mask"]
    lengths = [len(_fairseq(sp, s)) for s in SENTENCES[:3]]
    assert ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert ids.shape == (3, max(lengths))
    for row, n in enumerate(lengths):
        assert ids[row, :n].tolist() == _fairseq(sp, SENTENCES[row])
        assert (ids[row, n:] == PAD).all() and mask[row, n:].all() and not mask[row, :n].any()
    full = tok(SENTENCES[:3], pad_to_max_len=True)
    assert full["input_ids"].shape == (3, 64)
    assert torch.equal(full["input_ids"][:, : ids.shape[1]], ids)
    assert (full["input_ids"][:, ids.shape[1] :] == PAD).all()


def test_empty_caption(tiny_spm):
    tok = BEiT3Tokenizer(tiny_spm)
    assert tok.encode("") == [BOS, EOS]
    assert tok([])["input_ids"].shape == (0, 2)


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        BEiT3Tokenizer(tmp_path / "beit3.spm")
    bad = tmp_path / "bad.spm"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(InputError, match="not a SentencePiece model"):
        BEiT3Tokenizer(bad)


# -- against an independent implementation: transformers' XLMRobertaTokenizer, as unilm/beit3 builds it ----
ODD = [
    "  two  spaces   and a tab\there ",  # whitespace folding
    "ﬁne ① Ｆｕｌｌ width",  # NFKC (the spm model's normalizer)
    "a man a woman a dog a cat riding a bike on the street with a red hat " * 3,  # longer than max_len
]


@pytest.fixture(scope="module")
def xlmr(tiny_spm, tmp_path_factory):
    """transformers' XLMRobertaTokenizer on the same spm model (unilm/beit3: XLMRobertaTokenizer(beit3.spm)).

    transformers 5 builds it through its SentencePiece converter, which reads the model with protobuf."""
    import shutil

    from transformers import XLMRobertaTokenizer

    directory = tmp_path_factory.mktemp("xlmr")
    shutil.copy(tiny_spm, directory / "sentencepiece.bpe.model")  # the file name transformers looks for
    return XLMRobertaTokenizer.from_pretrained(directory)


def test_fairseq_mapping_equals_transformers_xlmroberta(tiny_spm, sp, xlmr):
    tok = BEiT3Tokenizer(tiny_spm)
    # the id table: specials, every piece, <unk> and <mask>
    assert (xlmr.bos_token_id, xlmr.pad_token_id, xlmr.eos_token_id, xlmr.unk_token_id) == (BOS, PAD, EOS, UNK)
    for k in range(3, sp.get_piece_size()):
        assert xlmr.convert_tokens_to_ids(sp.id_to_piece(k)) == k + 1, sp.id_to_piece(k)
    assert len(xlmr) == tok.vocab_size and xlmr.mask_token_id == tok.vocab_size - 1
    # whole captions as unilm/beit3's _get_text_segment builds them: tokenize -> ids -> [:max_len - 2] -> <s> .. </s>
    for max_len in (64, 8):
        tok = BEiT3Tokenizer(tiny_spm, max_len=max_len)
        for text in SENTENCES + ODD:
            ids = xlmr.convert_tokens_to_ids(xlmr.tokenize(text))
            assert tok.encode(text) == [BOS, *ids[: max_len - 2], EOS], (max_len, text)
            assert xlmr(text)["input_ids"] == [BOS, *ids, EOS]  # the tokenizer's own special-token wrapping agrees
