"""moecore inside other frameworks' trainers. Nothing here is imported by moecore itself, and
each integration imports its framework only when it is imported (no framework is a dependency
of the package).

- :mod:`moecore.integrations.torch` — the MoE layer and a block-sparse linear layer as
  ``torch.nn.Module`` s, and a DDP communication hook compressing gradients with moecore's
  top-k (see docs/embedding.md).
"""
