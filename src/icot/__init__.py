"""icot: implicit chain-of-thought reasoning by knowledge distillation and stepwise internalization."""

__version__ = "0.1.0"
