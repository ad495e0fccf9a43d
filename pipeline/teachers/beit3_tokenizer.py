"""The BEiT-3 text tokenizer: XLM-RoBERTa SentencePiece (`beit3.spm`) with the fairseq id mapping.

unilm/beit3 tokenizes captions with `transformers.XLMRobertaTokenizer(beit3.spm)`, whose ids follow the
fairseq dictionary rather than the SentencePiece model's own:

    fairseq id   0 = <s>   1 = <pad>   2 = </s>   3 = <unk>   k + 1 = SentencePiece piece k (k >= 1)

and SentencePiece id 0 -- the model's own <unk> -- becomes 3 (XLMRobertaTokenizer._convert_token_to_id:
`spm_id + 1 if spm_id else unk_token_id`). SentencePiece ids 1 and 2 are the model's control symbols
<s> / </s>, which never come out of encoding text. The <mask> entry sits after the last piece, hence
64002 entries for a 64000-piece model.

A caption becomes `[0] + ids[:max_len - 2] + [2]` (official `_get_text_segment`), padded with 1; the
padding mask is True on pads. Text is not lowercased (the SentencePiece model's own normalisation, NFKC
and whitespace folding, applies).

Two deliberate differences from the official code path, both on inputs real captions do not have: an empty
caption becomes `[0, 2]` (the official `_get_text_segment` raises), and literal special-token strings in
a caption ("<s>", "<mask>", ...) are tokenized as text (transformers' slow tokenizer would turn them into
the special ids, with version-dependent whitespace stripping around them).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import InputError

BOS, PAD, EOS, UNK = 0, 1, 2, 3
FAIRSEQ_OFFSET = 1


class BEiT3Tokenizer:
    def __init__(self, model_file: str | Path, max_len: int = 64, num_threads: int = -1):
        import sentencepiece as spm

        self.path = Path(model_file)
        if not self.path.is_file():
            raise InputError(f"{self.path}: BEiT-3 tokenizer file (beit3.spm) not found")
        if max_len < 2:
            raise InputError(f"max_text_len={max_len}: must be at least 2 (<s> and </s>)")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as err:
            raise InputError(f"{self.path}: not a SentencePiece model ({str(err).strip()[:160]})") from None
        self.max_len = int(max_len)
        self.num_threads = num_threads

    @property
    def vocab_size(self) -> int:
        """Number of fairseq ids: the 4 specials, the pieces after the first, and <mask>."""
        return self.sp.get_piece_size() + FAIRSEQ_OFFSET + 1

    def piece_ids(self, texts: list[str]) -> list[list[int]]:
        """Fairseq ids of each text's pieces, without <s> / </s> and without truncation."""
        out = self.sp.encode(list(texts), num_threads=self.num_threads)
        return [[UNK if i == 0 else i + FAIRSEQ_OFFSET for i in ids] for ids in out]

    def encode(self, text: str) -> list[int]:
        """One caption -> `[0] + pieces[:max_len - 2] + [2]`, unpadded."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        keep = self.max_len - 2
        return [[BOS, *ids[:keep], EOS] for ids in self.piece_ids(texts)]

    def lengths(self, texts: list[str]) -> list[int]:
        """Tokens per caption after truncation, <s> and </s> included."""
        return [len(ids) for ids in self.encode_batch(texts)]

    def __call__(self, texts: list[str], pad_to_max_len: bool = False) -> dict[str, torch.Tensor]:
        """Captions -> {"input_ids": [B, L] int64, "padding_mask": [B, L] bool (True on pads)}.

        L is the longest caption of the batch; with `pad_to_max_len`, `max_len` as in the official code
        (the features are the same either way: padded keys are masked)."""
        if isinstance(texts, str):
            raise TypeError("tokenize a list of captions, not a single str")
        seqs = self.encode_batch(texts)
        width = self.max_len if pad_to_max_len else max((len(s) for s in seqs), default=2)
        ids = torch.full((len(seqs), width), PAD, dtype=torch.int64)
        mask = torch.ones((len(seqs), width), dtype=torch.bool)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s, dtype=torch.int64)
            mask[row, : len(s)] = False
        return {"input_ids": ids, "padding_mask": mask}
