class InteropError(ValueError):
    """A Hugging Face directory or checkpoint that cannot be converted; the message names the tensor/field."""
