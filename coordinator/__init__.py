"""Coordinator: registry and placement of layer ranges over stages (grows in the coordinator issue)."""
