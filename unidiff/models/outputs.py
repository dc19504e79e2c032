"""The values the model pieces hand to each other and to the loss.

``Prediction`` is the single class defined in ``unidiff.corruption.losses`` (the loss
checks ``isinstance(pred, Prediction)``), re-exported here so model code and users can
take it from ``unidiff.models``.

Shape glossary: B batch, L tokens, K visible tokens, P = p*p*C values per patch,
W encoder width.
"""

from __future__ import annotations

from typing import NamedTuple

from jaxtyping import Array, Float

from unidiff.corruption.losses import Prediction

__all__ = ["EncoderOutput", "Prediction"]


class EncoderOutput(NamedTuple):
    """What the encoder returns: its patch tokens, the pooled representation and the
    conditioning vector the later pieces reuse (so time/label embeddings run once)."""

    tokens: Float[Array, "b k w"]  # patch tokens only (CLS / cond tokens stripped), shuffle order
    rep: Float[Array, "b w"]  # mean of CLS outputs (or of tokens when there is no CLS)
    cond: Float[Array, "b w"]  # silu(t_emb + y_emb)
