"""Training and evaluation: `vk.fit` (the loop), `vk.evaluate` (finetuned, linear, knn, fewshot protocols)."""
from .fit import FitResult, NonFiniteLossError, add_loss, fit, lr_at

__all__ = ["FitResult", "NonFiniteLossError", "add_loss", "fit", "lr_at"]
