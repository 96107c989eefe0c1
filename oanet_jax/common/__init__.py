"""Host utilities shared by training, evaluation, data generation and benchmarks."""
