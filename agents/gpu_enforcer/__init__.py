"""GPU memory enforcer: stops pods whose GPU memory exceeds their agreed share of a
time-sliced NVIDIA card, so that one notebook cannot OOM everyone else on it."""
