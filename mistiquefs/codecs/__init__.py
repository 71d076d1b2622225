"""Codecs: how intermediates are represented in chunks (lossless, float16, k-bit quantiles, threshold bits,
pooled summaries), composed into validated chains that serialize to JSON. See ``codecs/base.py``."""

from mistiquefs.codecs.base import SchemeError, TileSpec
from mistiquefs.codecs.chain import DEFAULT_SCHEME, Chain, SchemePolicy, parse_scheme, parse_scheme_option

__all__ = ["Chain", "DEFAULT_SCHEME", "SchemeError", "SchemePolicy", "TileSpec", "parse_scheme",
           "parse_scheme_option"]
