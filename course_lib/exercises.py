"""Running a notebook's loops on the student's own exercise functions.

A loop the lecture teaches (the GAN step, Algorithm 1, Algorithm 2, the guided step) calls the
student's ``my_*`` function. In the student version of a notebook (``nbgrader
generate_assignment``) that function is a placeholder raising ``NotImplementedError`` until it is
written; :func:`or_reference` then runs course_lib's reference instead and says so in one line, so
the rest of the notebook still runs.
"""
from __future__ import annotations

import functools
from collections.abc import Callable


def or_reference(student: Callable, reference: Callable) -> Callable:
    """``student``, or ``reference`` from the first call on which ``student`` raises
    ``NotImplementedError`` (printed once). Any other error of the student's function propagates."""
    if not callable(student) or not callable(reference):
        raise TypeError(f"or_reference expects two functions, got {type(student).__name__} and "
                        f"{type(reference).__name__}: pass the exercise function itself, not its result.")
    use_reference = False

    @functools.wraps(student)
    def call(*args, **kwargs):
        nonlocal use_reference
        if not use_reference:
            try:
                return student(*args, **kwargs)
            except NotImplementedError:
                use_reference = True
                print(f"{student.__name__} is not written yet: running "
                      f"{reference.__module__}.{reference.__qualname__} in its place.")
        return reference(*args, **kwargs)

    call.uses_reference = lambda: use_reference
    return call
