//! Block-sparse (BSR) matrices and their matmuls (forward, dX, and dW at kept blocks only).
