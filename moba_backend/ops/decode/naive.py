"""Sparse paged decode, torch reference: a decode token is a one-token prefill (SPEC.md), so the
reference is the prefill reference applied to one token per request."""

from moba_backend.ops.prefill.naive import sparse_attention

__all__ = ["sparse_attention"]
