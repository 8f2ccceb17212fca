"""The parts of `benchmarks/ssr_cost.py`, one module each; see that script's docstring.

inference   (a) exported SSR student vs exported DAFormer student
fusion      (b) SSR's cross-attention fusion, fused SDPA vs explicit softmax
train_step  (c) one UDA training step per method, SAM online vs cached
cache       (d) what the SAM feature cache changes and costs (used by (c))
markdown    the README tables of the JSON file
"""
