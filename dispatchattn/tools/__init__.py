"""Offline tools run from the command line (``python -m dispatchattn ...``); the runtime never imports them."""
