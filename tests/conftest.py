import os
import shutil

import pytest
import torch

import train

# The tests use tiny models, for which one thread is fastest; several threads fighting over two
# shared cores can be 30x slower. Subprocesses inherit the setting through OMP_NUM_THREADS.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# ATEN_CPU_CAPABILITY forces torch's own kernels to those of an older CPU, while oneDNN and the C++
# compiler of torch.compile (-march=native) still see this one. The tests of the two seams that mix
# them (marker native_kernels) are skipped there. On an Intel Xeon with avx2 forced, bf16 flash
# attention asks oneDNN whether to pack for VNNI, oneDNN says yes for this CPU, and the AVX2 copy
# of the kernel that runs cannot ("pack_vnni2 is only supported when avx512 is supported"); compiled
# code gave a NaN loss (AVX2 vector code built for the native ISA; it passes on an AMD EPYC). With
# default forced, on any CPU, inductor writes vector code without its vector headers (a C++ compile
# error). On a CPU whose own kernels are AVX2 (an AMD EPYC) nothing is forced: every test runs.
FORCED = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
FORCED_BELOW_HARDWARE = FORCED == "default" or FORCED == "avx2" and torch.cpu._is_avx512_supported()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="ATEN_CPU_CAPABILITY forced below this CPU's kernels, which oneDNN "
                                   "and torch.compile still use (tests/conftest.py)")
    for item in items:
        if FORCED_BELOW_HARDWARE and item.get_closest_marker("native_kernels"):
            item.add_marker(skip)


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
