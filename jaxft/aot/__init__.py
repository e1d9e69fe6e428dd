"""Ahead of time, for hardware this machine does not have: TPU slices by name,
the collectives and a roofline estimate of a compiled step, and the mesh /
remat / micro-batch planner (`jaxft plan`)."""
