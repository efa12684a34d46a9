"""Loading, token layout and the block runner (DESIGN §3-§4)."""
from . import cvt  # registers cvt_13 / cvt_21 / cvt_w24 with timm
from .layout import TokenLayout, token_layout
from .loading import CheckpointMismatchError, HubUnreachableError, load
from .runner import POINTS, BlockContext, TokenState, get_runner

__all__ = ["TokenLayout", "token_layout", "load", "CheckpointMismatchError", "HubUnreachableError", "POINTS",
           "BlockContext", "TokenState", "get_runner"]
