"""Backbones: presets and loading, weights, the preprocessing recipe, the torch / ONNX Runtime
forward."""
