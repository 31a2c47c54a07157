"""Performance tools beside the training path: `bench` and `bench_step` (step times, MFU), `quality`
(bench-quality), `memory_measure` (calibrates the planner) and `gpu_check`."""
