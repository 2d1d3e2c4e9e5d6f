"""Submission envelopes for tests: the fields a test cares about, every other one unset.

``schemas.envelope.encode_submission`` takes every field by name (the gateway's
hot path spells them all out); tests name only what they vary, through
``schemas.envelope.make_submission`` (which the benchmarks use too).
"""

from __future__ import annotations

from schemas.envelope import make_submission

__all__ = ["make_submission"]
