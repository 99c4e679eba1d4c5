"""A TensorFlow-Serving-compatible model server (gRPC PredictionService, ModelService, REST).

It serves any SavedModel directory layout that TF Serving reads and imports nothing from the
cascade's stages; docs/serving.md lists what is compatible and where it deviates.
"""
