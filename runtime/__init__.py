"""The runtime: compiled programs, buffers and the launch schedule, AOT artifacts."""
