import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every course_lib test of torch code runs on CPU, and on CUDA where a GPU is present."""
    return torch.device(request.param)
