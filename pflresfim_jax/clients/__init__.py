"""Client-side computation: local training over a stacked client axis."""
