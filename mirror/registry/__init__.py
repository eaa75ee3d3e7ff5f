"""Domain values of the registry protocol: digests, references, media types, manifests."""
