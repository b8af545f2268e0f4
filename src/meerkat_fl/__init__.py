"""meerkat-fl: federated fine-tuning of LLMs with sparse zeroth-order optimisation (Meerkat)."""

__version__ = "0.1.0"
