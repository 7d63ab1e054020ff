import os
import shutil

import pytest
import torch

import train

# The tests use tiny models, for which one thread is fastest; several threads fighting over two
# shared cores can be 30x slower. Subprocesses inherit the setting through OMP_NUM_THREADS.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture
def run(smoke_run, tmp_path):
    """A copy of the finished smoke run, free to damage."""
    return str(shutil.copytree(smoke_run, tmp_path / "run"))


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One smoke run of the whole pipeline (`python train.py --preset smoke`), shared by the tests."""
    d = str(tmp_path_factory.mktemp("run"))
    here = os.getcwd()
    os.chdir(os.path.dirname(d))  # a relative run directory, as the default runs/default is
    try:
        train.main(["--preset", "smoke", "--run", os.path.basename(d)])
    finally:
        os.chdir(here)
    return d
