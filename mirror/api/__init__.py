"""The HTTP face of the node: routing, handlers, responses, middleware."""
