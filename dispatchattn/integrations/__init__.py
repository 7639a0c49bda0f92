"""Adapters that plug ``dispatchattn.attention`` into other libraries' registries.

- ``dispatchattn.integrations.transformers``: ``register()`` adds an ``attn_implementation`` to Hugging Face
  transformers (its ``AttentionInterface`` and ``AttentionMaskInterface``).

Each adapter imports its library only when used, so importing this package costs nothing.
"""
