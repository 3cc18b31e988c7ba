"""Inference runtimes, kept apart from the HTTP layer and from the bundle format."""
