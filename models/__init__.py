"""synthperf models layer."""
