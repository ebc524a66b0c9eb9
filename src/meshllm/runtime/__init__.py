"""Sequences, sampling, the scheduler (continuous batching) and the pipeline driver."""
