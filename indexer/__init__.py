"""lookalike's indexing core: decoding, embedding backbones, storage and the FAISS index."""

__version__ = "0.1.0"
