"""The process around the step: joining hosts, preemption signals, host memory policy, profiling and the compilation cache."""
