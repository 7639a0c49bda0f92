"""dispatchattn: one attention call that runs the fastest correct kernel for the device and the problem.

>>> import torch, dispatchattn as da
>>> q = k = v = torch.randn(2, 4, 64, 32)
>>> out = da.attention(q, k, v, mask_mod=da.masks.sliding_window(16) & da.masks.causal())
>>> da.explain(q, k, v, is_causal=True).backend
'sdpa'
"""

from . import masks, scores
from .api import attention, explain
from .selector import Decision, UnsupportedError, use_backends
from .varlen import varlen_attention
from .version import __version__

__all__ = ["attention", "varlen_attention", "explain", "masks", "scores", "use_backends", "UnsupportedError",
           "Decision", "__version__"]
