"""Tasks: data and metrics, one module per task."""
