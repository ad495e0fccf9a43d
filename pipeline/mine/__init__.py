"""The mine stage: the teacher's top-K neighbours over the whole bank, and cross-encoder scores on them."""
