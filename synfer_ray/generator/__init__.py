"""The SynFER generator: AU adapter, semantic guidance, DDIM inversion and the guided sampler.

Pure PyTorch and diffusers; nothing here imports Ray.
"""
