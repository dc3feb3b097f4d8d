"""Everything the Triton models call: request parsing, response shaping, metrics, the model classes."""
