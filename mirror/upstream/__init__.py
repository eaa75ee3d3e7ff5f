"""The node's side of the link: an HTTP client for the upstream registry."""
