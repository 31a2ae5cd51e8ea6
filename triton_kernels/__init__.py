"""Fused Triton kernels, installed as ``ichiban_comm.triton_kernels``."""
