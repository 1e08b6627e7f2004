"""Bytes on disk: lazy, validated safetensors reading per tensor, the durable writers, expert checks.

Owns the safetensors format (headers, offsets, dtypes) on the way in and out. May import only the
ground floor (:mod:`hf_merge.errors`, :mod:`hf_merge.log`, :mod:`hf_merge.sizes`); nothing here
knows about the Hub, methods or evaluation.
"""
