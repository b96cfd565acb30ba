"""Byte-level BPE tokenizers: the bundled references, and the fast exact encoding engine."""
