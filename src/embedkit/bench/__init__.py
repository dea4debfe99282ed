"""All measurement: in-process and HTTP benchmarks, load/soak runs, profiling, roofline,
cost, the performance gate and the release records."""
