"""Integrations with other libraries, imported on demand:
``from attnkit.integrations import hf``."""
