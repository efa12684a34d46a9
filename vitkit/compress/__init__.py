"""Compression methods (pruning, quantization, binarization)."""
