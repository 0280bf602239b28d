"""Evaluation: GLUE metrics, inference latency, and pass@k of generated code."""
