"""Tiny CLIP and SigLIP models built from configs, offline, with real tokenizers and image processors:
what `save_pretrained` writes for a hub model, small enough for a CPU test."""

from __future__ import annotations

import io
from pathlib import Path

import torch

CORPUS = ["a photo of a cat", "a dog on the grass", "two birds in the sky", "red car", "the quick brown fox"]


def tiny_clip(directory: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in "abcdefghijklmnopqrstuvwxyz!.,":
            vocab[c + suffix] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=24)
    text = dict(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=24,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(
        image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=12, logit_scale_init_value=2.3))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def tiny_siglip(directory: Path, seed: int = 0) -> Path:
    import sentencepiece as spm
    from transformers import SiglipConfig, SiglipModel, SiglipTokenizer
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=buf,
        vocab_size=30,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "source.spm").write_bytes(buf.getvalue())
    tokenizer = SiglipTokenizer(vocab_file=str(directory / "source.spm"), model_max_length=16)
    text = dict(
        vocab_size=30,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_size=16,
    )
    vision = dict(
        image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():  # as trained models have them (the init values are 0 and 0)
        model.logit_scale.fill_(2.0)
        model.logit_bias.fill_(-1.5)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "source.spm").unlink()
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def tiny_siglip2(directory: Path, seed: int = 0) -> Path:
    """SigLIP2 NaFlex: patches of the image at its own aspect ratio (at most 16 of 8x8 pixels), a mask."""
    from transformers import Siglip2Config, Siglip2Model, Siglip2Tokenizer
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for c in "abcdefghijklmnopqrstuvwxyz▁":
        vocab[c] = len(vocab)
    tokenizer = Siglip2Tokenizer(vocab=vocab, merges=[], model_max_length=16)
    text = dict(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_size=16,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    vision = dict(
        num_patches=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    torch.manual_seed(seed)
    model = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision))
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
        model.logit_bias.fill_(-1.5)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16).save_pretrained(directory)
    return directory


def tiny_blip_retrieval(directory: Path, seed: int = 0) -> Path:
    """BLIP's retrieval model (ITC + ITM heads) with a BERT WordPiece tokenizer, as Salesforce/blip-itm-*."""
    from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]", *"abcdefghijklmnopqrstuvwxyz"]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab_file=str(directory / "vocab.txt"), model_max_length=16)
    text = dict(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        encoder_hidden_size=16,
        pad_token_id=0,
        bos_token_id=5,
        sep_token_id=3,
    )
    vision = dict(
        image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=12))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    BlipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory
