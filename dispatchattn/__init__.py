"""dispatchattn: one attention call that runs the fastest correct kernel for the device and the problem."""

from . import masks, scores

__version__ = "0.1.0"
