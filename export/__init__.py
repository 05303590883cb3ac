"""ONNX export of the device half, parity checks, graph optimisation, packages."""
