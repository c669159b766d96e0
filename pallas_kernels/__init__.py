"""Pallas TPU (Mosaic) and GPU (Triton) kernels for sparsejax, one package per op.

This package imports nothing from `sparsejax`; each kernel is checked against the
XLA reference of its op in the tests.
"""
