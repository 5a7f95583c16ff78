"""Suite-wide settings."""

import torch

# Small float64 ops (depthwise conv1d above all) run ~100x slower with 2 threads than with 1
# on a loaded 2-core machine; the tests use tiny shapes, so one thread is fastest.
torch.set_num_threads(1)
