"""Reading sources, decoding images, writing and reading a run's output, resuming."""
