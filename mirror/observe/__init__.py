"""What monitoring sees: Prometheus metrics and the access log."""
