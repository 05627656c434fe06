"""Pure decision logic: policy model and decisions, launch plans, reports. No I/O."""
