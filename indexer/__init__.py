"""lookalike's indexing core: decoding, embedding backbones, storage and the FAISS index."""

import os

# FAISS and torch run OpenMP thread teams whose idle members spin (300,000 rounds) at every
# barrier. With another busy process on one of two cores, the spinning member keeps its waited-for
# partner off the CPU: building the approximate index of 2,400 vectors took 148 s instead of 3.3 s.
# Passive waiting costs nothing measurable on an idle machine. Set before libgomp loads, which
# reads it once; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
