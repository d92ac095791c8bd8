"""Linear classification heads on frozen embeddings: labels, training, evaluation, tagging."""
