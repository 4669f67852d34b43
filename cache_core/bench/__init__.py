"""The built-in bench: synthetic tasks, pretraining of the built-in model, and the policy benchmark.

Apart from the engine (`cache_core`), which never imports it: these modules may use Lightning, omegaconf, rich and
matplotlib. Each decodes through the engine's one generate loop.
"""
