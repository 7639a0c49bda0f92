"""The in-house Triton flex kernel (backend name "triton_flex").

- ``codegen``: score_mod / mask_mod -> readable Triton functions (and the score_mod's derivative),
  cached in memory and on disk by a hash of the traced graphs; ``unsupported_reason`` for refusals.
- ``block_mask``: empty / partial / full (q tile, kv tile) lists, analytic for ``da.masks``.
- ``kernels``: forward and backward Triton kernels, their launch arguments and ``aot_entry``.
- ``autograd``: ``triton_flex_attention(q, k, v, *, score_mod, mask_mod, scale, ...)``.
- ``backend``: ``TritonFlexBackend``, the adapter the selector uses.

Importing this package or ``backend`` does not import triton; launching, compiling or generating does.
"""
