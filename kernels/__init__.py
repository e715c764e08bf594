"""Fused kernels for RAN, each beside its plain-PyTorch reference."""
