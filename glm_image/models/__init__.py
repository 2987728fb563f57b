"""Our own implementations of the GLM-Image models, one file per model."""
