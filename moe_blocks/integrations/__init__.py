"""Integrations of moe-blocks' kernel into other libraries.

- :mod:`moe_blocks.integrations.transformers`: an experts implementation named ``"moe_blocks"``
  for transformers' MoE models (``experts_implementation="moe_blocks"``), and
  :func:`~moe_blocks.integrations.transformers.patch_jetmoe` for its JetMoe.

Each submodule imports its library when imported itself; this package imports nothing.
"""
