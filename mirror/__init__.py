"""mirror: a pull-through cache node for Docker/OCI registries."""

__version__ = "0.1.0"
