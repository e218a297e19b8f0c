"""Coordinator: registry and placement of layer ranges over stages."""
