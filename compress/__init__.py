"""Compression techniques (one module each), plans and the planner."""
