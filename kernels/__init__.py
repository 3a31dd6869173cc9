"""Triton kernels of yarn-triton, installed as ``yarn_triton.kernels``."""
