"""Triton kernels (GPU; CPU under TRITON_INTERPRET=1): `linear_logprobs` holds the log-prob backend."""
