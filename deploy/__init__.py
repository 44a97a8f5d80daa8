"""Deployment helpers that run outside the training stack (TensorRT 10.8+ / 11 strongly typed
engine build/run, API conformance check, GPU check).
See deploy/README.md. Nothing here imports tensorrt at import time."""
