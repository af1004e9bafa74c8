"""The CPU speed machinery: PCG64 dropout masks (`dropout`), the frozen prefix run without autograd and the last
layer for the first token only (`frozen_prefix`), and the frozen prefix's activation cache (`prefix_cache`)."""
