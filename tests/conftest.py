"""Fixtures shared by the student, training and evaluation tests: a tiny WordPiece tokenizer and one thread.

`KDPIPE_TEST_WITHOUT=demo` (any extras of pyproject.toml, comma-separated) runs the suite as on a machine
without those extras (tests/extras.py)."""

import os
from pathlib import Path

import pytest
import torch

if os.environ.get("KDPIPE_TEST_WITHOUT"):  # tests/extras.py: as on a machine without these extras
    from extras import hide_extras

    HIDDEN_MODULES = hide_extras([e.strip() for e in os.environ["KDPIPE_TEST_WITHOUT"].split(",") if e.strip()])

# the vocabulary of the tiny test tokenizer (after the five BERT special tokens)
WORDS = "a the dog cat man woman red blue runs sits on in with photo of".split()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread. With two threads on a busy 2-core machine every small op waits for
    the other thread to be scheduled (a tiny train step goes from ~30 ms to ~0.5 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A local BERT tokenizer directory (uncased WordPiece over WORDS), as a text tower's `tokenizer` path."""
    from transformers import BertTokenizer

    root = tmp_path_factory.mktemp("tok")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(vocab=str(root / "vocab.txt"), do_lower_case=True).save_pretrained(root / "tok")
    return root / "tok"


@pytest.fixture(autouse=True)
def restore_kdpipe_loggers():
    """A CLI call inside a test configures the `pipeline` and `stages` loggers (level, console handler;
    pipeline/progress.py `configure_logging`): put them back, so that what a later test's caplog sees does
    not depend on which tests ran before it."""
    import logging

    saved = {n: (lg.level, list(lg.handlers)) for n in ("pipeline", "stages") for lg in [logging.getLogger(n)]}
    yield
    for name, (level, handlers) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers[:] = handlers
