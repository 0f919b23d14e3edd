"""mdfer: multi-domain facial expression recognition trained on Ray."""

__version__ = "0.1.0"
