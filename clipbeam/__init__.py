"""clipbeam: CLIP embeddings, sharded FAISS indexes, zero-shot labels and
VQGAN+CLIP renders as Apache Beam batch pipelines."""

__version__ = "0.1.0"
