"""Training and evaluation: `vk.fit` (the loop), `vk.evaluate` (finetuned, linear, knn, fewshot protocols)."""
from .evaluate import PROTOCOLS, evaluate, features
from .fit import FitResult, NonFiniteLossError, add_loss, fit, lr_at
from .hparams import ResumeMismatchError, default_hparams

__all__ = ["PROTOCOLS", "evaluate", "features", "FitResult", "NonFiniteLossError", "add_loss", "fit", "lr_at",
           "ResumeMismatchError", "default_hparams"]
