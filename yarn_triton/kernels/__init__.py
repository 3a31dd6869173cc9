"""The Triton kernel of yarn-triton (``rope_kernel``) and its launcher."""
