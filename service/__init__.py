"""synthperf service layer."""
