"""layerline: pipeline-parallel LLM inference across mismatched machines over gRPC."""

__version__ = "0.1.0"
