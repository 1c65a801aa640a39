"""DinoBloom: self-supervised foundation models for single blood and bone-marrow cells."""

import os

# OpenMP threads that wait at a barrier sleep instead of spinning. Spinning bought nothing measurable in training
# (its data-loader workers share the cores anyway), and when anything else runs on the cores a spinning thread's
# wait stalls every parallel region: the demo training on 2 busy cores ran at 6.8 images/s spinning and 23 sleeping
# (docs/benchmarks.md). OpenMP reads the policy once, when torch loads it, so it is set here, before any module of
# the package imports torch (the scripts import this package first); a policy set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
