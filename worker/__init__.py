"""synthperf worker layer."""
