"""Data plane: collectives and state transfer between peers."""
