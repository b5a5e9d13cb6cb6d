"""Evaluation: retrieval, ASR under noise, probes, reports."""
