"""Samplers as plain functions over a model callable: schedule, Euler, guidance wrappers, inversion."""
