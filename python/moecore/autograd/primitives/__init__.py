"""The primitive differentiable operations ``Tensor``'s operators and methods are made of.

Elementwise arithmetic and pointwise functions, reshaping and indexing, reductions and matrix
products, each a :class:`moecore.autograd.Function` over raw arrays with a functional entry
point (``add``, ``reshape``, ``sum``, ``matmul``…) that :mod:`moecore.ops` re-exports. The
coarse operations (attention, norms, the MoE layer…) live in :mod:`moecore.ops`.
"""
