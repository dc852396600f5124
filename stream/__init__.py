"""Streaming engine: receive detector frames over ZeroMQ and fold them into accumulators."""
