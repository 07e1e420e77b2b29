"""course_lib: tested PyTorch building blocks for the Generative Deep Modeling course.

One module per idea; each cites the equation or algorithm it implements.
"""
from course_lib.runtime import get_device, quick_mode, seed_everything

__all__ = ["get_device", "quick_mode", "seed_everything"]
__version__ = "0.1.0"
