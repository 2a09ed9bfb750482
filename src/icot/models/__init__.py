"""Models: causal LMs, the hidden-state hooks, and the teacher / student / emulator built on them."""
