"""synthperf cli layer."""
