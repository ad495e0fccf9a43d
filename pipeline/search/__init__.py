"""Searching a gallery with the student: faiss indexes over its image embeddings, and text/image queries."""
