"""Local storage: content-addressed objects on disk, metadata in SQLite."""
