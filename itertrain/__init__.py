"""itertrain: iterative training of Hugging Face causal LMs with checkpoint recovery that never loses work."""

__version__ = "0.1.0"
