"""Derived artifacts of an fp32 parent: fused FP32, dynamic/static INT8, FP16."""
