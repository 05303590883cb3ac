"""Device runner (numpy + onnxruntime only), link, server, profiles, profiler, cost model."""
