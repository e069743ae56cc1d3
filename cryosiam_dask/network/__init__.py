"""The network: checkpoint reading, the model, tiling plans, prediction per chunk, the original's tiling.

Importing this package does not import torch; the modules that need it import it themselves.
"""
