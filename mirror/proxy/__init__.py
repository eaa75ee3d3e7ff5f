"""The pull-through logic: local store first for digests, upstream first for tags."""
