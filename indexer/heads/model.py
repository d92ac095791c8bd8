"""A trained linear head, applied with NumPy (no torch needed to tag images).

Scores are bit-for-bit the same for an image whatever batch it comes in. BLAS picks its kernel and
summation order by the matrix shape (one row goes through gemv, more through gemm; threads and
blocking follow the size), so the same product computed at index time (batches of 32), by
`lookalike tag` (chunks of 2,000) or for one image differed in the 7th digit, and a score sitting on
a threshold could change its label. Every product is therefore computed in blocks of exactly
`BLOCK` rows (the last one zero-padded), in float64, and rounded to float32; the activation runs in
float64 on the same padded block. The stored score and the decision (`score >= threshold`) are that
one float32 value. (One exception: a re-tag from an approximate index reads its float16 copy of
the vectors; there the decisions are still those of the float32 vectors, see `fragile_rows`,
and the other images' scores differ in the 4th or 5th digit.)
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass, field

import numpy as np

BINARY, MULTICLASS, MULTILABEL = "binary", "multiclass", "multilabel"
BLOCK = 32  # rows per matrix product: one shape for every call, so one summation order
HEAD_TYPES = (BINARY, MULTICLASS, MULTILABEL)


@dataclass
class Head:
    """Weights act on the stored unit-length embeddings: scores = activation(x @ weight.T + bias).

    binary: one logit, sigmoid = probability of `labels[1]` (the positive class);
    multiclass: one logit per label, softmax; multilabel: one logit per label, sigmoid.
    """

    name: str
    kind: str
    labels: list[str]
    weight: np.ndarray  # (outputs, dim) float32
    bias: np.ndarray  # (outputs,) float32
    thresholds: list[float] = field(default_factory=list)  # binary: [t]; multilabel: one per label
    min_confidence: float = 0.0  # multiclass: below this the top label is not tagged
    score_floor: float = 0.5  # multiclass: other labels at or above this are tagged too

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """(n, outputs) float32: sigmoid for binary/multilabel, softmax for multiclass; batch-independent."""
        x = np.asarray(x, dtype=np.float32)
        weight_t, bias = self._float64_weights
        out = np.empty((len(x), len(bias)), dtype=np.float32)
        block = np.zeros((BLOCK, weight_t.shape[0]), dtype=np.float64)
        for start in range(0, len(x), BLOCK):
            rows = x[start : start + BLOCK]
            block[: len(rows)] = rows
            block[len(rows) :] = 0.0
            out[start : start + len(rows)] = self._activate(block @ weight_t + bias)[: len(rows)]
        return out

    @functools.cached_property
    def _float64_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(dim, outputs) and (outputs,) in float64, made once: every batch tagged at index time uses them."""
        return np.ascontiguousarray(self.weight.astype(np.float64).T), self.bias.astype(np.float64)

    def _activate(self, logits: np.ndarray) -> np.ndarray:
        if self.kind == MULTICLASS:
            logits = logits - logits.max(axis=1, keepdims=True)
            exp = np.exp(logits)
            return exp / exp.sum(axis=1, keepdims=True)
        return 1.0 / (1.0 + np.exp(-logits))

    def predict_tags(self, x: np.ndarray) -> list[list[tuple[str, float]]]:
        """The (label, score) tags of each row, following the head's decision rule."""
        return self.decide(self.probabilities(x))

    def decide(self, probs: np.ndarray) -> list[list[tuple[str, float]]]:
        """The (label, score) tags of each row of probabilities, following the head's decision rule
        (multi-class: the top label first)."""
        labels, mask, scores = self.tag_matrix(probs)
        top = probs.argmax(axis=1) if self.kind == MULTICLASS else None
        out = []
        for i, row in enumerate(mask):
            chosen = np.flatnonzero(row).tolist()
            if top is not None and top[i] in chosen and chosen[0] != top[i]:
                chosen.remove(top[i])
                chosen.insert(0, int(top[i]))
            out.append([(labels[j], float(scores[i, j])) for j in chosen])
        return out

    def tag_matrix(self, probs: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The decision rule on a whole block: (label names, tagged (n, L) bool, scores (n, L) float32).

        binary: the positive label at or above the threshold (score p), else the negative one
        (score 1 - p); multi-label: each label at or above its threshold; multi-class: the top
        label from `min_confidence` on, and any other at or above `score_floor`."""
        probs = np.asarray(probs, dtype=np.float32)
        if self.kind == BINARY:
            p = probs[:, 0]
            positive = p >= (self.thresholds[0] if self.thresholds else 0.5)
            return list(self.labels), np.stack([~positive, positive], axis=1), np.stack([1.0 - p, p], axis=1)
        if self.kind == MULTILABEL:
            thresholds = np.asarray(self.thresholds or [0.5] * len(self.labels))
            return list(self.labels), probs >= thresholds, probs
        rows = np.arange(len(probs))
        top = probs.argmax(axis=1)
        mask = probs >= self.score_floor
        mask[rows, top] = probs[rows, top] >= self.min_confidence
        return list(self.labels), mask, probs

    def fragile_rows(self, probs: np.ndarray, input_error: np.ndarray) -> np.ndarray:
        """Which rows' decisions could differ on the exact inputs, when each input row x' computed
        here lies within `input_error[i]` (L2) of the exact one: (n,) bool.

        Each logit then moves by at most |w_c| * input_error[i] (Cauchy-Schwarz). A sigmoid moves
        by at most a quarter of that, so a binary or multi-label decision can flip only within that
        band of its threshold. A softmax probability's log moves by at most twice the largest logit
        bound, so a multi-class decision can flip only where the two likeliest labels are within
        that ratio, or a probability lies that close to `min_confidence` or `score_floor`. The
        1e-6 covers the float32 rounding of the scores."""
        probs = np.asarray(probs, dtype=np.float64)
        logit_bound = np.linalg.norm(self.weight.astype(np.float64), axis=1)[None, :] * input_error[:, None]
        if self.kind in (BINARY, MULTILABEL):
            thresholds = np.asarray(self.thresholds or [0.5] * probs.shape[1], dtype=np.float64)
            return (np.abs(probs - thresholds) <= logit_bound / 4 + 1e-6).any(axis=1)
        log_bound = 2 * logit_bound.max(axis=1, keepdims=True)
        band = probs * np.exp(log_bound) * np.expm1(log_bound) + 1e-6
        ordered = np.sort(probs, axis=1)
        top, second = ordered[:, -1], ordered[:, -2] if probs.shape[1] > 1 else np.zeros(len(probs))
        close_top = top <= second * np.exp(log_bound[:, 0]) + 1e-6
        close_confidence = np.abs(top - self.min_confidence) <= band.max(axis=1)
        close_floor = (np.abs(probs - self.score_floor) <= band).any(axis=1)
        return close_top | close_confidence | close_floor

    def weights_blob(self) -> bytes:
        out = io.BytesIO()
        np.savez(out, weight=self.weight.astype(np.float32), bias=self.bias.astype(np.float32))
        return out.getvalue()

    @staticmethod
    def arrays_from_blob(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
        with np.load(io.BytesIO(blob)) as data:
            return data["weight"], data["bias"]
