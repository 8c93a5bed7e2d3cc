"""Staging: host buffers the caller's tensors are copied into, the plan of where each tensor
goes, and the walk over a state dict's containers."""
