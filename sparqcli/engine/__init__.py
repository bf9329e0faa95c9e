"""Pure tensor functions: sparsify, quantize, the two pipeline orders, statistics. No I/O."""
