"""moe_dist: distributed training of sparse Mixture-of-Experts vision-language models."""

__version__ = "0.1.0"
