"""Fused verify kernels (Triton on CUDA tensors, PyTorch reference elsewhere) behind one dispatcher."""

from nld_lora.kernels.dispatch import set_backend, verify_greedy, verify_sampled

__all__ = ["set_backend", "verify_greedy", "verify_sampled"]
