"""Training and evaluation: `vk.fit` (the loop), `vk.evaluate` (finetuned, linear, knn, fewshot protocols)."""
from .evaluate import PROTOCOLS, evaluate, features
from .fit import FitResult, NonFiniteLossError, add_loss, fit, lr_at

__all__ = ["PROTOCOLS", "evaluate", "features", "FitResult", "NonFiniteLossError", "add_loss", "fit", "lr_at"]
