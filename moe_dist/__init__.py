"""moe_dist: expert-parallel Mixture-of-Experts language-model training."""

__version__ = "0.1.0"
