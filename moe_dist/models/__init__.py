"""Models: the decoder-only LM and its attention and FFN blocks."""
