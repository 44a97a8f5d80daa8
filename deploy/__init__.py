"""Deployment helpers that run outside the training stack (TensorRT 10 engine build/run).
See deploy/README.md. Nothing here imports tensorrt at import time."""
