"""DinoBloom: self-supervised foundation models for single blood and bone-marrow cells."""

__version__ = "0.1.0"
