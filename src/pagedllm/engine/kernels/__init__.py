"""The engine's kernels: cpu (C++ for AVX-512 BF16 CPUs, csrc/), prepacked_linear (oneDNN), and
gpu_attention (written in OpenAI's Triton language, not to be confused with Triton Inference Server)."""
