import os

import torch

# The tests use tiny models, for which one thread is fastest; several threads fighting over two
# shared cores can be 30x slower. Subprocesses inherit the setting through OMP_NUM_THREADS.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
