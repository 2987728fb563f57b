"""The benchmark harness (`glm-image bench`): speed against the reference, text-rendering quality."""
