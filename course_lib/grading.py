"""Checkers for the graded exercises of the notebooks, called from their nbgrader test cells.

Each ``check_*`` takes the student's function, runs it on seeded inputs (several shapes, float32
and float64 where the exercise allows both, and the edge cases: t = 0, t = T - 1, t_prev = -1,
sigma = 1, logits of +-200, ...), compares with course_lib's reference, and returns None or
raises :class:`GradingError` with a message for the student: the input, what was expected, what
came back, and a hint where the slip is a known one (wrong sign, a sum where a mean belongs,
alpha_bar for sqrt(alpha_bar), an off-by-one in t, ...). While the student's function runs, the
reference functions raise (:func:`forbid`), so an answer that only calls them earns nothing.

A test cell is one line, the checker called on the student's function (its signature is in
the checker's docstring):

    01_gan                  check_discriminator_loss(my_discriminator_loss)
                            check_generator_loss(my_generator_loss)
    02_dcgan                check_generator_block(my_generator_block)
    03_autoencoder          check_reconstruction_loss(my_reconstruction_loss)
    04_vae                  check_reparameterize(my_reparameterize)
                            check_kl_divergence(my_kl_divergence)
    05_diffusion_schedules  check_cosine_betas(my_cosine_betas)
                            check_q_step(my_q_step)
                            check_q_sample(my_q_sample)
    06_ddpm                 check_ddpm_loss(my_ddpm_loss)
                            check_ddpm_step(my_ddpm_step)
                            check_ddim_step(my_ddim_step)
    07_text_to_image        check_guided_eps(my_guided_eps)
                            check_guided_prediction(my_guided_prediction)
    08_fid                  check_frechet_distance(my_frechet_distance)
    09_normalization        check_group_norm(my_group_norm)
    10_flow_matching        check_flow_matching_loss(my_flow_matching_loss)
                            check_euler_step(my_euler_step)
                            grade_flow_checkpoint(SUBMISSION): points by the model's FID
    11_latent_diffusion     check_latent_scale(my_latent_scale)
                            check_latent_decode(my_decode)
"""
from __future__ import annotations

import math
import numbers
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from course_lib import (autoencoder, diffusion, flow_matching, gan, imagen, latent, metrics,
                        normalization, vae)


class GradingError(AssertionError):
    """A graded answer is wrong; the message tells the student what to fix. An AssertionError,
    so that nbgrader and pytest count it as a failed test."""


# --- delegation ------------------------------------------------------------------------------

def _delegation_stub(*args, **kwargs):
    """The code a forbidden function runs instead of its own: it keeps the function's globals,
    and :func:`forbid` gives it the function's name, so the frame names the reference."""
    import sys

    from course_lib.grading import GradingError
    frame = sys._getframe()
    raise GradingError(f"your answer calls {frame.f_globals['__name__']}.{frame.f_code.co_name}, "
                       f"the reference solution; write the computation yourself")


class _ForbiddenOps(TorchDispatchMode):
    """While active, every torch operator in ``ops`` (``"aten::native_group_norm"``, ...)
    raises GradingError, whichever Python name reached it: ``torch.group_norm``,
    ``F.group_norm``, ``nn.GroupNorm``, ``torch.ops.aten.native_group_norm``,
    ``getattr(torch, "group" + "_norm")``, ... all end in the same operator."""

    def __init__(self, ops: Sequence[str]):
        super().__init__()
        self.ops = frozenset(ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.ops:
            raise GradingError(f"your answer calls torch's {name.removeprefix('aten::')} "
                               f"({name}), the library function this exercise asks you to "
                               f"write; compute it from torch's elementary operations")
        return func(*args, **(kwargs or {}))


@contextmanager
def forbid(*functions: types.FunctionType | str) -> Iterator[None]:
    """While the block runs, calling any of ``functions`` raises GradingError ("your answer calls
    course_lib.vae.kl_divergence, the reference solution; ..."). Three guards:

    - each Python function's ``__code__`` is swapped, so every reference to the same function
      object raises, however it was imported (``from course_lib.vae import kl_divergence as
      kl``, ``vae.kl_divergence``, a course_lib helper that calls it);
    - a profile hook (``sys.setprofile``) raises on any frame that runs a forbidden function's
      code, so a copy of it (``types.FunctionType(vae.kl_divergence.__code__, ...)``, taken
      before the swap, or the function from a second import of its file) raises too;
    - a string names a torch operator (``"aten::native_group_norm"``): :class:`_ForbiddenOps`
      raises whenever it runs, whatever alias called it.

    Everything is restored afterwards, also when the block raises. Only plain functions without
    free variables: a swapped code object must have as many as the function's closure. None of
    the references is a closure (every checker's list passes through here in
    ``tests/test_grading.py``)."""
    import sys

    python = [function for function in functions if not isinstance(function, str)]
    ops = [function for function in functions if isinstance(function, str)]
    for function in python:
        if not isinstance(function, types.FunctionType) or function.__code__.co_freevars:
            raise TypeError(f"forbid() takes Python functions without free variables (no "
                            f"closures) or aten operator names, got {function!r}")
    originals = [function.__code__ for function in python]
    where = {(code.co_filename, code.co_firstlineno, code.co_name): function
             for code, function in zip(originals, python)}

    def profile(frame, event, arg):
        if event == "call":
            code = frame.f_code
            function = where.get((code.co_filename, code.co_firstlineno, code.co_name))
            if function is not None:
                raise GradingError(f"your answer calls {function.__module__}."
                                   f"{function.__name__}, the reference solution; write the "
                                   f"computation yourself")

    previous = sys.getprofile()
    try:
        for function in python:
            function.__code__ = _delegation_stub.__code__.replace(
                co_name=function.__name__, co_qualname=function.__qualname__)
        with _ForbiddenOps(ops) if ops else nullcontext():
            if where:
                sys.setprofile(profile)
            yield
    finally:
        sys.setprofile(previous)
        for function, code in zip(python, originals):
            function.__code__ = code


# --- comparing a student's results with the reference's --------------------------------------

@dataclass
class Case:
    """One input of an exercise: the arguments (the same for the student's function and the
    reference), the words that name it in a message ("for t = 0, x_t [4, 1, 8, 8] (float64)"),
    and a hint shown when the answer fails on it and no known mistake explains the failure."""

    args: tuple
    describe: str
    kwargs: dict = field(default_factory=dict)
    hint: str = ""


Mistake = tuple[str, Callable]  # (hint, a wrong implementation with the student's signature)


def _copy(value):
    """A copy the student's function may change in place (a tensor's copy keeps its graph)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    return value.copy() if isinstance(value, np.ndarray) else value


def _call(exercise: str, function: Callable, case: Case, forbidden: Sequence = ()):
    """The student's function on a copy of the case's inputs, with the references forbidden; any
    exception becomes a GradingError that names it, the input and the exercise."""
    args = [_copy(value) for value in case.args]
    kwargs = {name: _copy(value) for name, value in case.kwargs.items()}
    with forbid(*forbidden):
        try:
            return function(*args, **kwargs)
        except GradingError as error:
            raise GradingError(f"{exercise}: {error}") from None
        except Exception as error:
            detail = f": {error}" if str(error) else ""
            hint = case.hint
            if isinstance(error, NotImplementedError):
                hint = "Replace the NotImplementedError placeholder with your solution."
            elif "must match the size" in str(error):
                hint = ("Check how your tensors broadcast: to scale images [B, C, H, W] by one "
                        "number per sample, view the [B] numbers as [B, 1, 1, 1].")
            raise GradingError(f"{exercise} raised {type(error).__name__}{detail} "
                               f"{case.describe}." + (f" {hint}" if hint else "")) from error


def _shape(x: torch.Tensor) -> str:
    return f"[{', '.join(map(str, x.shape))}]" + (" (a scalar)" if x.ndim == 0 else "")


def _kind(value) -> str:
    if value is None:
        return "None"
    if isinstance(value, np.ndarray):
        return "a numpy array"
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}"
    return f"a {type(value).__name__}"


def _as_tensor(exercise: str, got, expected: torch.Tensor, case: Case) -> torch.Tensor:
    if type(got) is torch.Tensor:
        return got.detach()
    if isinstance(got, torch.Tensor):
        raise GradingError(f"{exercise} returned a {type(got).__name__}, a subclass of "
                           f"torch.Tensor, {case.describe}: return a plain torch.Tensor, the "
                           f"result of torch operations on the inputs.")
    hint = ""
    if got is None:
        hint = " Did you forget to `return` it?"
    elif isinstance(got, np.ndarray):
        hint = " Compute with torch operations (torch.exp, torch.sqrt, ...) instead of numpy."
    elif isinstance(got, numbers.Number) and expected.ndim == 0:
        hint = (" Keep the result a tensor (no .item() or float()), so that it can be "
                "backpropagated.")
    elif isinstance(got, tuple):
        hint = " Return only the tensor."
    raise GradingError(f"{exercise} returned {_kind(got)} {case.describe}, expected a "
                       f"torch.Tensor.{hint}")


def _as_number(exercise: str, got, case: Case) -> float:
    if type(got) is torch.Tensor and got.numel() == 1:
        got = _TensorBase.item(got)
    elif type(got) in (np.ndarray, np.float64, np.float32) and got.size == 1:
        got = got.item()
    if isinstance(got, numbers.Real) and not isinstance(got, bool):
        return float(got)
    hint = ""
    if isinstance(got, numbers.Complex):
        hint = (" Take the real part: scipy.linalg.sqrtm returns tiny imaginary parts from "
                "rounding.")
    elif got is None:
        hint = " Did you forget to `return` it?"
    raise GradingError(f"{exercise} returned {_kind(got)} {case.describe}, expected a number."
                       f"{hint}")


_IMMUTABLE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE: a type defined in C, closed to Python code
_TensorBase = torch._C.TensorBase


def _plain(x) -> np.ndarray | float:
    """A float64 copy of a result or reference value that no Python code can have shaped: a
    plain torch.Tensor's numbers read by torch._C.TensorBase's own methods (an immutable type:
    a patched ``torch.Tensor.numpy`` or ``detach`` is not called), a number as a float. A
    tensor subclass, or a ``torch.Tensor``/``TensorBase`` replaced in the torch module, is
    refused here rather than read."""
    if type(x) is torch.Tensor and torch.Tensor.__mro__[1] is _TensorBase and (
            _TensorBase.__flags__ & _IMMUTABLE):
        return _TensorBase.numpy(_TensorBase.cpu(_TensorBase.detach(x))).astype("float64")
    if type(x) is float:
        return x
    raise GradingError(f"cannot grade a {type(x).__name__}: the notebook replaced torch.Tensor "
                       f"or returned an object that only looks like a tensor or a number.")


def _agrees(expected, got, rtol: float, atol: float) -> bool:
    """Whether ``got`` is ``expected`` within the tolerances (NaN matching NaN), both from
    :func:`_plain`. Only operators and methods of numpy.ndarray and float, immutable types, so
    a notebook that patched numpy.allclose, torch.allclose, numpy.testing or torch.testing
    changes nothing here."""
    if type(expected) is float or type(got) is float:
        if type(expected) is not float or type(got) is not float:
            return False
        return (got == expected or (got != got and expected != expected)
                or (got - expected).__abs__() <= atol + rtol * expected.__abs__())
    if expected.shape != got.shape:
        return False
    close = (got - expected).__abs__() <= atol + rtol * expected.__abs__()
    return (close | (got == expected) | ((got != got) & (expected != expected))).all()


def _float64(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().cpu().to(torch.float64)


def _close(expected: torch.Tensor, got: torch.Tensor, rtol: float, atol: float) -> bool:
    return _agrees(_plain(expected), _plain(got), rtol, atol)


def _factor_hint(factor: float) -> str:
    if factor >= 2 and abs(factor - round(factor)) < 1e-3:
        return " (a sum where a mean belongs?)"
    if 0 < factor <= 0.5 and abs(1 / factor - round(1 / factor)) < 1e-3:
        return " (a mean where a sum belongs?)"
    return ""


def diagnose(expected, got) -> str:
    """How ``got`` differs from ``expected`` when the slip is a common one, as a phrase: "has the
    wrong sign", "is off by a factor of 16 (a sum where a mean belongs?)", "is off by a constant
    0.5", "is transposed", "has the right values in the wrong shape", "misses the mean over
    dimension 0", ...; "" when none fits. A single number fits any factor and any offset, so
    for one only the factors that suggest a sum for a mean (or the reverse) are named."""
    e, g = _float64(expected), _float64(got)

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return _close(a, b, rtol=1e-4, atol=1e-6 * (1 + e.abs().max().item()))

    if e.shape != g.shape:
        if g.numel() == e.numel():
            if g.ndim == 2 and close(g.T, e):
                return "is transposed"
            if close(g.reshape(e.shape), e):
                return "has the right values in the wrong shape"
        for dim in range(g.ndim if g.ndim > e.ndim else 0):  # size-1 dimensions are ambiguous
            for name, reduce in (("mean", torch.mean), ("sum", torch.sum)):
                if g.shape[dim] > 1 and close(reduce(g, dim), e):
                    return f"misses the {name} over dimension {dim}"
        for dim in range(e.ndim if e.ndim > g.ndim else 0):
            if e.shape[dim] > 1 and (close(e.sum(dim), g) or close(e.mean(dim), g)):
                return f"reduces over dimension {dim}, which the result should keep"
        return ""
    if not torch.isfinite(g).all():
        return "is not finite (nan/inf)"
    if close(g, e):
        return "is slightly off (computed in a lower precision?)"
    if close(g, -e):
        return "has the wrong sign"
    if not g.any():
        return "returns only zeros"
    if g.ndim == 2 and g.shape[0] == g.shape[1] and close(g.T, e):
        return "is transposed"
    single = e.numel() == 1
    if e.any():
        factor = ((g * e).sum() / (e * e).sum()).item()
        if close(g, factor * e) and (_factor_hint(factor) or not single):
            return f"is off by a factor of {factor:.4g}{_factor_hint(factor)}"
    offset = (g - e).mean().item()
    if not single and close(g, e + offset):
        return f"is off by a constant {offset:.4g}"
    return ""


def _values(expected: torch.Tensor, got: torch.Tensor) -> str:
    """Expected and returned values, where they differ most for a tensor."""
    if expected.numel() == 1:
        return f"expected {expected.item():.4g}, got {got.item():.4g}"
    difference = (got - expected).abs().nan_to_num(nan=math.inf).flatten()
    index = np.unravel_index(int(difference.argmax()), tuple(expected.shape))
    return (f"at index {list(map(int, index))} expected {expected[index].item():.4g}, got "
            f"{got[index].item():.4g}")


def check_result(exercise: str, expected, got, case: Case, mistakes: Sequence[Mistake] = (),
                 rtol: float | None = None, atol: float | None = None) -> None:
    """Raise GradingError unless ``got`` is ``expected`` (a tensor: the same type, shape, dtype and
    values within rtol/atol, by default 1e-6/1e-8 in float64 and 1e-4/1e-5 otherwise; a number:
    any real scalar). The message names the case and, when the answer matches a wrong
    implementation in ``mistakes``, gives that mistake's hint; otherwise it names the slip that
    :func:`diagnose` recognises, and adds the case's hint unless the slip is in the shape."""
    if isinstance(expected, torch.Tensor):
        got = _as_tensor(exercise, got, expected, case)
        if got.shape == expected.shape and got.dtype != expected.dtype:
            raise GradingError(
                f"{exercise} returns {got.dtype} {case.describe}, expected {expected.dtype}: keep "
                f"the dtype of the inputs (convert float64 coefficients with .to(x.dtype)).")
        double = expected.dtype == torch.float64
    else:
        got = _as_number(exercise, got, case)
        double = True
    rtol = rtol if rtol is not None else 1e-6 if double else 1e-4
    atol = atol if atol is not None else 1e-8 if double else 1e-5
    if _agrees(_plain(expected), _plain(got), rtol, atol):
        return
    e, g = _float64(expected), _float64(got)  # what follows only words the failure
    hint = next((hint for hint, wrong in mistakes
                 if _close(_float64(wrong(*case.args, **case.kwargs)), g, rtol, atol)), None)
    slip = "" if hint else diagnose(e, g)
    if e.shape != g.shape:
        message = (f"{exercise} returns the wrong shape {case.describe}: expected {_shape(e)}, "
                   f"got {_shape(g)}" + (f"; it {slip}" if slip else ""))
        hint = hint or ("" if slip else case.hint)
    else:
        message = f"{exercise} {slip or 'is wrong'} {case.describe}: {_values(e, g)}"
        hint = hint or case.hint
    raise GradingError(message + "." + (f" {hint}" if hint else ""))


def compare(exercise: str, student: Callable, reference: Callable, cases: Sequence[Case],
            forbidden: Sequence = (), mistakes: Sequence[Mistake] = (),
            rtol: float | None = None, atol: float | None = None) -> None:
    """Check the student's function against the reference on every case, in order: the
    student's function runs first, with ``forbidden`` swapped out, so that no expected value
    exists yet for it to find (in a caller's frame, say); then the reference, outside
    :func:`forbid`. Raises GradingError at the first case that fails (see
    :func:`check_result`)."""
    for case in cases:
        got = _call(exercise, student, case, forbidden)
        expected = reference(*case.args, **case.kwargs)
        check_result(exercise, expected, got, case, mistakes, rtol, atol)


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _about(x: torch.Tensor) -> str:
    return f"{_shape(x)} ({str(x.dtype).removeprefix('torch.')})"


# --- 01_gan ----------------------------------------------------------------------------------

_SOFTPLUS_HINT = ("Compute the loss from the logits with softplus: -log sigmoid(l) = "
                  "softplus(-l) and -log(1 - sigmoid(l)) = softplus(l) stay finite and exact "
                  "where sigmoid(l) rounds to 0 or 1 (already at |l| > 17 in float32).")
_CERTAIN = torch.tensor([-200.0, -3.0, 0.0, 2.5, 200.0])  # includes a D that is certain


def check_discriminator_loss(fn: Callable) -> None:
    """``my_discriminator_loss(real_logits, fake_logits)`` (01_gan) is
    :func:`course_lib.gan.discriminator_loss`: (BCE(real, 1) + BCE(fake, 0)) / 2 from logits,
    each averaged over the batch, finite for logits of +-200."""
    sp = F.softplus
    cases = [
        Case((_randn(16, seed=0) * 4, _randn(16, seed=1) * 4),
             "for random real and fake logits [16] (float32)", hint=_SOFTPLUS_HINT),
        Case((_randn(8, seed=2, dtype=torch.float64) * 4,
              _randn(8, seed=3, dtype=torch.float64) * 4),
             "for random real and fake logits [8] (float64)", hint=_SOFTPLUS_HINT),
        Case((_CERTAIN, _CERTAIN.flip(0)), "for logits of -200, -3, 0, 2.5, 200 (and reversed)",
             hint=_SOFTPLUS_HINT),
    ]
    mistakes = [
        ("Average each cross-entropy over the batch with .mean(), not .sum().",
         lambda r, f: (sp(-r).sum() + sp(f).sum()) / 2),
        ("The discriminator loss is the mean of the two cross-entropies: divide their sum by 2.",
         lambda r, f: sp(-r).mean() + sp(f).mean()),
        ("Real images have label 1 (loss softplus(-l_real)) and fakes label 0 (loss "
         "softplus(l_fake)); you swapped the labels.",
         lambda r, f: (sp(r).mean() + sp(-f).mean()) / 2),
    ]
    compare("my_discriminator_loss", fn, gan.discriminator_loss, cases,
            (gan.discriminator_loss,), mistakes)


def check_generator_loss(fn: Callable) -> None:
    """``my_generator_loss(fake_logits, saturating=False)`` (01_gan) is
    :func:`course_lib.gan.generator_loss`: the batch mean of softplus(-l) = -log D(G(z)), or with
    ``saturating=True`` of -softplus(l) = log(1 - D(G(z))); finite for logits of +-200."""
    sp = F.softplus
    logits, logits64 = _randn(16, seed=0) * 4, _randn(8, seed=1, dtype=torch.float64) * 4
    cases = [Case((logits,), "for random fake logits [16] (float32) and the default "
                             "saturating=False", hint=_SOFTPLUS_HINT)]
    for x, saturating in ((logits, True), (logits64, False), (logits64, True)):
        cases.append(Case((x,), f"for random fake logits {_about(x)}, saturating={saturating}",
                          {"saturating": saturating}, _SOFTPLUS_HINT))
    for saturating in (False, True):
        cases.append(Case((_CERTAIN,), f"for fake logits -200, -3, 0, 2.5, 200, "
                                       f"saturating={saturating}",
                          {"saturating": saturating}, _SOFTPLUS_HINT))
    mistakes = [
        ("You swapped the two losses: saturating=True is the minimax log(1 - D(G(z))) = "
         "-softplus(l); the default is the non-saturating -log D(G(z)) = softplus(-l).",
         lambda l, saturating=False: (sp(-l) if saturating else -sp(l)).mean()),
        ("Average over the batch with .mean(), not .sum().",
         lambda l, saturating=False: (-sp(l) if saturating else sp(-l)).sum()),
    ]
    compare("my_generator_loss", fn, gan.generator_loss, cases, (gan.generator_loss,), mistakes)


# --- 02_dcgan --------------------------------------------------------------------------------

_BLOCK_HINT = ("The block is nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), "
               "nn.BatchNorm2d(c_out), nn.ReLU()): kernel 4, stride 2 and padding 1 make "
               "H_out = (H - 1) * 2 - 2 + 4 = 2H.")


def _check_state(exercise: str, block: nn.Module, reference: nn.Module, describe: str) -> None:
    """The block's parameters and buffers have the reference's names and shapes."""
    got = {name: list(value.shape) for name, value in block.state_dict().items()}
    want = {name: list(value.shape) for name, value in reference.state_dict().items()}
    if got == want:
        return
    missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    shapes = [f"{name} {got[name]} instead of {want[name]}"
              for name in sorted(want.keys() & got.keys()) if got[name] != want[name]]
    problems = [f"missing {', '.join(missing)}" if missing else "",
                f"unexpected {', '.join(unexpected)}" if unexpected else "",
                f"shapes {'; '.join(shapes)}" if shapes else ""]
    hint = _BLOCK_HINT
    if "0.bias" in unexpected:
        hint = ("Create the transposed convolution with bias=False: BatchNorm's shift makes a "
                "bias redundant.")
    elif got.get("0.weight", [])[:2] == want["0.weight"][1::-1]:  # c_in != c_out here
        hint = ("A ConvTranspose2d's weight is [c_in, c_out, k, k] and yours is [c_out, c_in, k, "
                "k]: did you use nn.Conv2d?")
    raise GradingError(f"{exercise} {describe} does not have the reference's parameters and "
                       f"buffers (state_dict): {'; '.join(p for p in problems if p)}. {hint}")


def check_generator_block(fn: Callable) -> None:
    """``my_generator_block(c_in, c_out)`` (02_dcgan) is :func:`course_lib.gan.generator_block`:
    an nn.Module whose state_dict has the reference's names and shapes (so the reference's
    weights load into it), whose output doubles H and W, and whose output equals the reference's
    with the same weights, in training and in eval mode."""
    exercise = "my_generator_block"
    for c_in, c_out in ((4, 6), (8, 3)):
        describe = f"for c_in = {c_in}, c_out = {c_out}"
        reference = gan.generator_block(c_in, c_out)
        block = _call(exercise, fn, Case((c_in, c_out), describe, hint=_BLOCK_HINT),
                      (gan.generator_block,))
        if not isinstance(block, nn.Module):
            raise GradingError(f"{exercise} returned {_kind(block)} {describe}, expected an "
                               f"nn.Module such as nn.Sequential. {_BLOCK_HINT}")
        _check_state(exercise, block, reference, describe)
        block.load_state_dict(reference.state_dict())
        x = _randn(2, c_in, 5, 5, seed=c_in)
        mistakes = [  # evaluated only after a failure: they update BatchNorm's statistics
            ("End the block with nn.ReLU(), DCGAN's generator activation, not a leaky one.",
             lambda x: F.leaky_relu(reference[1](reference[0](x)), 0.2)),
            ("End the block with nn.ReLU().", lambda x: reference[1](reference[0](x)))]
        for mode in ("training", "eval"):
            block.train(mode == "training")
            reference.train(mode == "training")
            case = Case((x,), f"{describe} on an input [2, {c_in}, 5, 5] in {mode} mode, with "
                              f"the reference's weights loaded", hint=_BLOCK_HINT)
            got = _call(f"the block from {exercise}", block, case, (gan.generator_block,))
            expected = reference(x)
            check_result(f"the block from {exercise}", expected, got, case, mistakes)


# --- 04_vae ----------------------------------------------------------------------------------

def _seeded(function: Callable) -> Callable:
    """function(mu, logvar, generator) called as (mu, logvar, seed) with a fresh generator."""
    return lambda mu, logvar, seed: function(mu, logvar, torch.Generator().manual_seed(seed))


def check_reparameterize(fn: Callable) -> None:
    """``my_reparameterize(mu, logvar, generator=None)`` (04_vae) is
    :func:`course_lib.vae.reparameterize`: mu + exp(logvar / 2) * eps with eps drawn by
    torch.randn(mu.shape, generator=generator), so the same seed gives the reference's sample
    (float32 inputs, the dtype torch.randn draws by default); the two calls with one seed agree;
    gradients reach mu (1) and logvar (exp(logvar / 2) eps / 2); with generator=None the samples
    have mean mu and standard deviation exp(logvar / 2)."""
    exercise, forbidden = "my_reparameterize", (vae.reparameterize,)
    mu, logvar = _randn(4, 3, seed=0), _randn(4, 3, seed=1)
    cases = [
        Case((mu, logvar, 0), "for random mu, logvar [4, 3] and torch.Generator().manual_seed(0)"),
        Case((torch.zeros(2, 5), torch.zeros(2, 5), 1),
             "for mu = 0, logvar = 0 (sigma = 1) [2, 5] and torch.Generator().manual_seed(1)"),
        Case((mu * 10, logvar - 6, 2), "for mu [4, 3] and a small sigma (logvar near -6), "
                                       "torch.Generator().manual_seed(2)"),
    ]

    def draw(mu: torch.Tensor, seed: int, sampler=torch.randn) -> torch.Tensor:
        return sampler(mu.shape, generator=torch.Generator().manual_seed(seed), dtype=mu.dtype)

    mistakes = [
        ("sigma = exp(logvar / 2): logvar is log sigma^2, so exp(logvar) is the variance.",
         lambda mu, logvar, seed: mu + logvar.exp() * draw(mu, seed)),
        ("logvar is log sigma^2, not sigma: sigma = exp(logvar / 2).",
         lambda mu, logvar, seed: mu + logvar * draw(mu, seed)),
        ("eps ~ N(0, I): draw it with torch.randn, not torch.rand.",
         lambda mu, logvar, seed: mu + (logvar / 2).exp() * draw(mu, seed, torch.rand)),
    ]
    first, second = (_call(exercise, _seeded(fn), cases[0], forbidden) for _ in range(2))
    if (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)
            and first.shape == second.shape and not torch.equal(first, second)):
        raise GradingError(f"{exercise} gives two different samples for the same generator seed "
                           f"{cases[0].describe}: draw eps with torch.randn(mu.shape, "
                           f"generator=generator), so that a seed fixes the sample.")
    compare(exercise, _seeded(fn), _seeded(vae.reparameterize), cases, forbidden, mistakes)
    _check_reparameterize_gradients(fn, cases[0], forbidden)
    _check_reparameterize_moments(fn, forbidden)


def _check_reparameterize_gradients(fn: Callable, case: Case, forbidden: tuple) -> None:
    """Gradients of ``my_reparameterize``'s sample reach mu and logvar as the reference's do."""
    exercise = "my_reparameterize"
    leaves = [x.clone().requires_grad_() for x in case.args[:2]]
    z = _call(exercise, _seeded(fn), Case((*leaves, 0), case.describe), forbidden)
    expected = torch.autograd.grad(_seeded(vae.reparameterize)(*leaves, 0).sum(), leaves)
    case = Case((*leaves, 0), case.describe)
    if not z.requires_grad:
        raise GradingError(f"{exercise}'s sample carries no gradient to mu and logvar "
                           f"{case.describe}: compute it with torch operations on mu and logvar "
                           f"(no .detach(), .item(), numpy or torch.no_grad()).")
    grads = torch.autograd.grad(z.sum(), leaves, allow_unused=True)
    for name, want, got in zip(("mu", "logvar"), expected, grads):
        if got is None:
            raise GradingError(f"no gradient of {exercise}'s sample reaches {name} "
                               f"{case.describe}: the sample must be computed from {name}.")
        check_result(f"the gradient of {exercise}'s sample with respect to {name}", want, got,
                     case)


def _check_reparameterize_moments(fn: Callable, forbidden: tuple) -> None:
    """With generator=None, ``my_reparameterize``'s samples have mean mu and std sigma."""
    exercise = "my_reparameterize"
    case = Case((torch.tensor([[1.0, -2.0]]).repeat(4000, 1), torch.full((4000, 2), math.log(4))),
                "for 4000 draws with mu = (1, -2), sigma = 2 (logvar = log 4) and generator=None")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        z = _as_tensor(exercise, _call(exercise, fn, case, forbidden), case.args[0], case)
    if z.shape != (4000, 2):
        raise GradingError(f"{exercise} returns the wrong shape {case.describe}: expected "
                           f"[4000, 2], got {_shape(z)}.")
    mean, std = z.mean(0), z.std(0)
    if not (_agrees(np.array([1.0, -2.0]), _plain(mean), rtol=0, atol=0.2)
            and _agrees(np.array([2.0, 2.0]), _plain(std), rtol=0.1, atol=0)):
        raise GradingError(f"{exercise}'s samples {case.describe} have mean "
                           f"({mean[0]:.3g}, {mean[1]:.3g}) and standard deviation "
                           f"({std[0]:.3g}, {std[1]:.3g}); expected (1, -2) and (2, 2).")


def check_kl_divergence(fn: Callable) -> None:
    """``my_kl_divergence(mu, logvar)`` (04_vae) is :func:`course_lib.vae.kl_divergence`:
    KL[N(mu, sigma^2) || N(0, I)] = -1/2 sum_j (1 + logvar - mu^2 - exp(logvar)) per sample [N];
    0 where mu = 0 and sigma = 1."""
    cases = [
        Case((torch.zeros(1, 2), torch.full((1, 2), math.log(4))),
             "for mu = 0, sigma = 2 (logvar = log 4), shape [1, 2]"),
        Case((torch.zeros(2, 3), torch.zeros(2, 3)),
             "for mu = 0, sigma = 1 (logvar = 0), shape [2, 3], where the KL is 0"),
        Case((_randn(4, 3, seed=0), _randn(4, 3, seed=1)), "for random mu, logvar [4, 3] (float32)"),
        Case(tuple(_randn(5, 2, seed=seed, dtype=torch.float64) for seed in (2, 3)),
             "for random mu, logvar [5, 2] (float64)"),
    ]
    mistakes = [
        ("logvar is log sigma^2, not log sigma: sigma^2 = exp(logvar), and log sigma^2 = logvar.",
         lambda mu, lv: -0.5 * torch.sum(1 + 2 * lv - mu ** 2 - (2 * lv).exp(), dim=1)),
        ("The KL of one sample sums over the latent dimensions (dim=1); don't average them.",
         lambda mu, lv: -0.5 * torch.mean(1 + lv - mu ** 2 - lv.exp(), dim=1)),
        ("Keep the 1 in -1/2 sum(1 + logvar - mu^2 - exp(logvar)).",
         lambda mu, lv: -0.5 * torch.sum(lv - mu ** 2 - lv.exp(), dim=1)),
    ]
    compare("my_kl_divergence", fn, vae.kl_divergence, cases, (vae.kl_divergence,), mistakes)


# --- 05_diffusion_schedules and 06_ddpm ------------------------------------------------------

_OFF_BY_ONE = ("Off by one in t: alphas_cumprod[t] and betas[t] already belong to code step t "
               "(code t = paper t + 1), so index them with t itself.")


def _cosine_betas(T, s=0.008, max_beta=0.999, power=2, clip=True, ratio_to_start=False):
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2)
    f = f ** power
    betas = 1 - f[1:] / (f[0] if ratio_to_start else f[:-1])
    return betas.clamp(max=max_beta) if clip else betas


def check_cosine_betas(fn: Callable) -> None:
    """``my_cosine_betas(T, s=0.008, max_beta=0.999)`` (05_diffusion_schedules) is
    :func:`course_lib.diffusion.cosine_schedule`'s betas [T] in float64: Nichol & Dhariwal 2021,
    eq. 17, alpha_bar(t) = f(t) / f(0) with f(t) = cos^2(((t/T + s) / (1 + s)) pi/2) for
    t = 0..T, and beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1) clipped at max_beta."""
    hint = ("Evaluate f at t = 0, 1, ..., T (T + 1 values: torch.arange(T + 1) in float64); the T "
            "betas are the ratios of neighbours.")
    cases = [Case((1000,), "for T = 1000 (default s and max_beta)", hint=hint),
             Case((50,), "for T = 50, s = 0.02, max_beta = 0.5", {"s": 0.02, "max_beta": 0.5},
                  hint),
             Case((10,), "for T = 10, s = 0", {"s": 0.0}, hint)]
    mistakes = [
        ("f(t) is the squared cosine, cos^2(...).",
         lambda T, s=0.008, max_beta=0.999: _cosine_betas(T, s, max_beta, power=1)),
        ("Clip each beta at max_beta: without the clip the last beta is 1 (alpha_bar(T) = 0), and "
         "the reverse process divides by sqrt(1 - beta_T) = 0.",
         lambda T, s=0.008, max_beta=0.999: _cosine_betas(T, s, max_beta, clip=False)),
        ("beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1), the ratio of neighbours; 1 - alpha_bar(t) "
         "is the noise variance of q(x_t | x_0), not the step's.",
         lambda T, s=0.008, max_beta=0.999: _cosine_betas(T, s, max_beta, ratio_to_start=True)),
    ]

    def reference(T, s=0.008, max_beta=0.999):
        return diffusion.cosine_schedule(T, s, max_beta).betas

    compare("my_cosine_betas", fn, reference, cases, (diffusion.cosine_schedule,), mistakes)


def _q(x0, t, noise, alphas_cumprod, signal_root=0.5, noise_root=0.5, shift=0):
    abar = alphas_cumprod[t - shift].to(x0.dtype).view(-1, *[1] * (x0.ndim - 1))
    return abar ** signal_root * x0 + (1 - abar) ** noise_root * noise


def check_q_sample(fn: Callable) -> None:
    """``my_q_sample(x0, t, noise, alphas_cumprod)`` (05_diffusion_schedules) is
    :func:`course_lib.diffusion.q_sample`: sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise for
    a tensor t [B] of code steps, including t = 0 and t = T - 1, for float32 images x0 (the
    notebook's; the course solution computes the coefficients in float32) and a float32 result
    (the schedule's alphas_cumprod is float64)."""
    cases = []
    for schedule, t, x0 in ((diffusion.linear_schedule(1000), [0, 99, 499, 999],
                             _randn(4, 1, 8, 8, seed=0)),
                            (diffusion.cosine_schedule(100), [5, 0, 99],
                             _randn(3, 2, 4, 4, seed=1))):
        noise = _randn(*x0.shape, seed=2, dtype=x0.dtype)
        cases.append(Case((x0, torch.tensor(t), noise, schedule.alphas_cumprod),
                          f"for x0 {_about(x0)}, t = {t} ({schedule.name} schedule, "
                          f"T = {schedule.T})"))
    mistakes = [
        ("The coefficients are standard deviations, sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t).",
         lambda *args: _q(*args, signal_root=1, noise_root=1)),
        ("The noise coefficient is sqrt(1 - alpha_bar_t): the lecture slide drops its square "
         "root.", lambda *args: _q(*args, noise_root=1)),
        ("The signal coefficient is sqrt(alpha_bar_t).", lambda *args: _q(*args, signal_root=1)),
        ("x0 gets sqrt(alpha_bar_t) and the noise sqrt(1 - alpha_bar_t), not the other way round.",
         lambda x0, t, noise, abar: _q(noise, t, x0, abar)),
        (_OFF_BY_ONE, lambda *args: _q(*args, shift=1)),
    ]

    def reference(x0, t, noise, alphas_cumprod):
        return diffusion.q_sample(diffusion.NoiseSchedule.from_alphas_cumprod(alphas_cumprod, ""),
                                  x0, t, noise)

    compare("my_q_sample", fn, reference, cases, (diffusion.q_sample,), mistakes)


def _ddpm(x_t, t, eps, betas, alphas_cumprod, z, sigma_power=0.5, eps_root=0.5, alpha_bar=False,
          alpha_root=0.5, noise_at_0=False, shift=0):
    beta, abar = betas[t - shift].item(), alphas_cumprod[t - shift].item()
    alpha = abar if alpha_bar else 1 - beta
    mean = (x_t - beta / (1 - abar) ** eps_root * eps) / alpha ** alpha_root
    return mean if t == 0 and not noise_at_0 else mean + beta ** sigma_power * z


def _diffusion_inputs(dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    return tuple(_randn(4, 1, 8, 8, seed=seed + i, dtype=dtype) for i in range(3))


def check_ddpm_step(fn: Callable) -> None:
    """``my_ddpm_step(x_t, t, eps, betas, alphas_cumprod, z)`` (06_ddpm) is
    :func:`course_lib.diffusion.ddpm_step` with sigma_t^2 = beta_t and no clipping: x_{t-1} =
    (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t) + sqrt(beta_t) z, without the
    noise at code t = 0 (paper t = 1); linear schedule, T = 1000, t an int."""
    schedule = diffusion.linear_schedule(1000)
    cases = []
    for t, dtype in ((999, torch.float64), (500, torch.float32), (1, torch.float64),
                     (0, torch.float64), (0, torch.float32)):
        x_t, eps, z = _diffusion_inputs(dtype, seed=t)
        cases.append(Case((x_t, t, eps, schedule.betas, schedule.alphas_cumprod, z),
                          f"for t = {t}, x_t, eps and z {_about(x_t)} (linear schedule, T = 1000)",
                          hint="At code t = 0 (paper t = 1) Algorithm 2 adds no noise: return "
                               "the mean alone." if t == 0 else ""))
    mistakes = [
        ("At code t = 0 (paper t = 1) Algorithm 2 adds no noise: return the mean alone.",
         lambda *args: _ddpm(*args, noise_at_0=True)),
        ("sigma_t = sqrt(beta_t): scale z by the standard deviation, not the variance.",
         lambda *args: _ddpm(*args, sigma_power=1)),
        ("The eps coefficient is beta_t / sqrt(1 - alpha_bar_t), with a square root.",
         lambda *args: _ddpm(*args, eps_root=1)),
        ("Divide by sqrt(alpha_t), not by alpha_t.", lambda *args: _ddpm(*args, alpha_root=1)),
        ("Divide by sqrt(alpha_t) with alpha_t = 1 - beta_t, one step's alpha; alpha_bar_t "
         "(alphas_cumprod) belongs only in the eps coefficient.",
         lambda *args: _ddpm(*args, alpha_bar=True)),
        (_OFF_BY_ONE, lambda *args: _ddpm(*args, shift=1)),
    ]

    def reference(x_t, t, eps, betas, alphas_cumprod, z):
        return diffusion.ddpm_step(schedule, x_t, t, t - 1, eps, variance="beta", clip=False,
                                   noise=z)[0]

    compare("my_ddpm_step", fn, reference, cases, (diffusion.ddpm_step,), mistakes)


def _ddim(x_t, t, t_prev, eps, alphas_cumprod, root=0.5, x0_root=0.5, wrap=False):
    a_t = alphas_cumprod[t].item()
    a_prev = alphas_cumprod[t_prev].item() if t_prev >= 0 or wrap else 1.0
    x0 = (x_t - (1 - a_t) ** x0_root * eps) / math.sqrt(a_t)
    return a_prev ** root * x0 + (1 - a_prev) ** root * eps


def check_ddim_step(fn: Callable) -> None:
    """``my_ddim_step(x_t, t, t_prev, eps, alphas_cumprod)`` (06_ddpm) is
    :func:`course_lib.diffusion.ddim_step` with eta = 0 and no clipping: sqrt(alpha_bar_prev) x0
    + sqrt(1 - alpha_bar_prev) eps with x0 = (x_t - sqrt(1 - alpha_bar_t) eps) /
    sqrt(alpha_bar_t), and alpha_bar_prev = 1 for t_prev = -1; linear schedule, T = 1000."""
    schedule = diffusion.linear_schedule(1000)
    minus_one = ("t_prev = -1 is the clean image, alpha_bar = 1; alphas_cumprod[-1] is the last "
                 "step's alpha_bar.")
    cases = []
    for t, t_prev, dtype in ((999, 899, torch.float64), (100, 0, torch.float32),
                             (50, -1, torch.float64), (0, -1, torch.float32)):
        x_t, eps, _ = _diffusion_inputs(dtype, seed=t)
        cases.append(Case((x_t, t, t_prev, eps, schedule.alphas_cumprod),
                          f"for t = {t}, t_prev = {t_prev}, x_t and eps {_about(x_t)} (linear "
                          f"schedule, T = 1000)", hint=minus_one if t_prev == -1 else ""))
    mistakes = [
        (minus_one, lambda *args: _ddim(*args, wrap=True)),
        ("The coefficients are sqrt(alpha_bar_prev) and sqrt(1 - alpha_bar_prev).",
         lambda *args: _ddim(*args, root=1)),
        ("The x0 estimate is (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t).",
         lambda *args: _ddim(*args, x0_root=1)),
    ]

    def reference(x_t, t, t_prev, eps, alphas_cumprod):
        return diffusion.ddim_step(schedule, x_t, t, t_prev, eps, eta=0.0, clip=False)[0]

    compare("my_ddim_step", fn, reference, cases, (diffusion.ddim_step,), mistakes)


# --- 07_text_to_image ------------------------------------------------------------------------

def check_guided_eps(fn: Callable) -> None:
    """``my_guided_eps(eps_cond, eps_uncond, w)`` (07_text_to_image) is
    :func:`course_lib.imagen.guided_eps`, Imagen's convention w eps_cond + (1 - w) eps_uncond:
    w = 1 gives eps_cond, w = 0 eps_uncond."""
    cases = []
    for w, dtype in ((3.0, torch.float32), (7.5, torch.float64), (1.0, torch.float32),
                     (0.0, torch.float32)):
        cond, uncond = _randn(2, 1, 4, 4, seed=1, dtype=dtype), _randn(2, 1, 4, 4, seed=2,
                                                                        dtype=dtype)
        cases.append(Case((cond, uncond, w), f"for w = {w:g}, eps_cond and eps_uncond "
                                             f"{_about(cond)}"))
    mistakes = [
        ("That is Ho & Salimans' convention, (1 + w) eps_cond - w eps_uncond; the course follows "
         "Imagen: w eps_cond + (1 - w) eps_uncond, so that w = 1 is no guidance.",
         lambda c, u, w: (1 + w) * c - w * u),
        ("w multiplies eps_cond and 1 - w eps_uncond; you swapped them.",
         lambda c, u, w: w * u + (1 - w) * c),
    ]
    compare("my_guided_eps", fn, imagen.guided_eps, cases, (imagen.guided_eps,), mistakes)


# --- 08_fid ----------------------------------------------------------------------------------

def _frechet(mu1, sigma1, mu2, sigma2, factor=2.0, mean_power=2, root="product"):
    with np.errstate(invalid="ignore"):
        trace_root = {
            "product": lambda: np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2).real),
            "roots": lambda: np.trace(scipy.linalg.sqrtm(sigma1).real
                                      @ scipy.linalg.sqrtm(sigma2).real),
            "trace": lambda: np.sqrt(np.trace(sigma1 @ sigma2)),
            "elementwise": lambda: np.trace(np.sqrt(sigma1 @ sigma2)),
        }[root]()
    distance = np.sqrt(np.sum((mu1 - mu2) ** 2))
    return float(distance ** mean_power + np.trace(sigma1) + np.trace(sigma2)
                 - factor * trace_root)


def check_frechet_distance(fn: Callable) -> None:
    """``my_frechet_distance(mu1, sigma1, mu2, sigma2)`` (08_fid, numpy arrays in, a number out)
    is :func:`course_lib.metrics.frechet_distance`: ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 -
    2 (sigma1 sigma2)^(1/2)); 0 for identical Gaussians."""
    rng = np.random.default_rng(0)

    def gaussian(d: int) -> tuple[np.ndarray, np.ndarray]:
        a = rng.standard_normal((d, d))
        return rng.standard_normal(d), a @ a.T + np.eye(d)

    (m1, s1), (m2, s2), (m3, s3), (m4, s4) = gaussian(1), gaussian(1), gaussian(3), gaussian(3)
    (m5, s5), (m6, _), (m7, s7), (m8, s8) = gaussian(4), gaussian(3), gaussian(10), gaussian(10)
    cases = [
        Case((m1, s1, m2, s2), "for two random Gaussians in D = 1"),
        Case((m3, s3, m4, s4), "for two random Gaussians in D = 3"),
        Case((m5, s5, m5, s5), "for two identical Gaussians in D = 4 (distance 0)"),
        Case((m3, s3, m6, s3), "for two Gaussians with the same covariance in D = 3"),
        Case((m7, s7, m8, s8), "for two random Gaussians in D = 10"),
    ]
    mistakes = [
        ("Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)): the square-root term counts twice.",
         lambda *args: _frechet(*args, factor=1.0)),
        ("(sigma1 sigma2)^(1/2) is the matrix square root of the product, "
         "scipy.linalg.sqrtm(sigma1 @ sigma2), not the product of the square roots.",
         lambda *args: _frechet(*args, root="roots")),
        ("Tr((sigma1 sigma2)^(1/2)) is the trace of the matrix square root, not the square root "
         "of the trace.", lambda *args: _frechet(*args, root="trace")),
        ("np.sqrt is element-wise; the matrix square root is scipy.linalg.sqrtm.",
         lambda *args: _frechet(*args, root="elementwise")),
        ("The mean term is the squared distance ||mu1 - mu2||^2.",
         lambda *args: _frechet(*args, mean_power=1)),
    ]
    compare("my_frechet_distance", fn, metrics.frechet_distance, cases,
            (metrics.frechet_distance,), mistakes, rtol=1e-5, atol=1e-6)


# --- 09_normalization ------------------------------------------------------------------------

def _normalized(x, dims, eps, correction=0, eps_inside=True):
    mean, var = x.mean(dims, keepdim=True), x.var(dims, correction=correction, keepdim=True)
    return (x - mean) / (torch.sqrt(var + eps) if eps_inside else torch.sqrt(var) + eps)


def _grouped(x, num_groups, eps=1e-5, dims=(2, 3, 4), strided=False, **options):
    n, c, h, w = x.shape
    if strided:  # channels g, g + G, g + 2G, ... in one group
        grouped = x.reshape(n, c // num_groups, num_groups, h, w).transpose(1, 2)
        return _normalized(grouped, dims, eps, **options).transpose(1, 2).reshape(x.shape)
    return _normalized(x.reshape(n, num_groups, c // num_groups, h, w), dims, eps,
                       **options).reshape(x.shape)


# torch's normalization operators, where torch.group_norm, F.group_norm, nn.GroupNorm,
# F.layer_norm, F.batch_norm, F.instance_norm and their torch.ops.aten spellings end
_NORMALIZATION_OPS = ("aten::native_group_norm", "aten::native_layer_norm",
                      "aten::native_batch_norm", "aten::_native_batch_norm_legit",
                      "aten::_native_batch_norm_legit_no_training", "aten::batch_norm",
                      "aten::instance_norm", "aten::group_norm", "aten::layer_norm")


def check_group_norm(fn: Callable) -> None:
    """``my_group_norm(x, num_groups, eps=1e-5)`` (09_normalization) is
    :func:`course_lib.normalization.group_norm` (= torch.nn.functional.group_norm without affine):
    (x - mean) / sqrt(var + eps) with the mean and biased variance over each sample's groups of
    C/G adjacent channels and H, W; G = 1 (layer norm), G = C (instance norm), and a given eps.
    Calling torch's normalization operators counts as delegation too (torch.group_norm,
    F.group_norm, nn.GroupNorm, F.layer_norm on the groups, torch.ops.aten.native_group_norm,
    whatever name reaches them)."""
    cases = []
    for shape, groups, dtype, kwargs in (((2, 4, 3, 3), 2, torch.float32, {}),
                                         ((1, 6, 5, 4), 3, torch.float64, {}),
                                         ((3, 8, 2, 2), 8, torch.float32, {}),
                                         ((2, 4, 3, 3), 1, torch.float32, {}),
                                         ((2, 6, 3, 3), 2, torch.float64, {"eps": 0.1})):
        x = _randn(*shape, seed=len(cases), dtype=dtype) * 2 + 3
        cases.append(Case((x, groups), f"for x {_about(x)}, num_groups = {groups}"
                          + (f", eps = {kwargs['eps']}" if kwargs else ""), kwargs,
                          "Use the eps argument." if kwargs else ""))
    axes = " (group norm takes the statistics over (C/G, H, W) of each sample and group)"
    mistakes = [
        ("A group is C/G adjacent channels: reshape to [N, G, C/G, H, W].",
         lambda x, g, eps=1e-5: _grouped(x, g, eps, strided=True)),
        ("Use the biased variance (unbiased=False), as Wu & He and torch do.",
         lambda x, g, eps=1e-5: _grouped(x, g, eps, correction=1)),
        ("eps goes inside the square root: sqrt(var + eps).",
         lambda x, g, eps=1e-5: _grouped(x, g, eps, eps_inside=False)),
        ("Statistics over (H, W) alone are instance norm" + axes + ".",
         lambda x, g, eps=1e-5: _normalized(x, (2, 3), eps)),
        ("Statistics over (C, H, W) are layer norm" + axes + ".",
         lambda x, g, eps=1e-5: _normalized(x, (1, 2, 3), eps)),
        ("Statistics over (N, H, W) are batch norm" + axes + "; group norm never mixes samples.",
         lambda x, g, eps=1e-5: _normalized(x, (0, 2, 3), eps)),
        ("Include H and W in the statistics" + axes + ".",
         lambda x, g, eps=1e-5: _grouped(x, g, eps, dims=(2,))),
    ]
    compare("my_group_norm", fn, normalization.group_norm, cases,
            (normalization.group_norm, normalization.normalize, *_NORMALIZATION_OPS), mistakes)


# --- 05_diffusion_schedules: one forward step ------------------------------------------------

def _one_step(x_prev, t, noise, betas, signal_root=0.5, noise_root=0.5, cumulative=False,
              swap=False, shift=0):
    rates = torch.cumprod(1 - betas, 0) if cumulative else 1 - betas
    alpha = rates[t - shift].to(x_prev.dtype).view(-1, *[1] * (x_prev.ndim - 1))
    if swap:
        x_prev, noise = noise, x_prev
    return alpha ** signal_root * x_prev + (1 - alpha) ** noise_root * noise


def check_q_step(fn: Callable) -> None:
    """``my_q_step(x_prev, t, noise, betas)`` (05_diffusion_schedules) is
    :func:`course_lib.diffusion.q_step`, one step of the forward process q(x_t | x_{t-1}):
    sqrt(1 - beta_t) x_prev + sqrt(beta_t) noise for a tensor t [B] of code steps, including
    t = 0 and t = T - 1 (the cosine schedule's clipped beta_T = 0.999), for float32 and float64
    images and a result of their dtype (the schedule's betas are float64)."""
    cases = []
    for schedule, t, dtype, shape in ((diffusion.linear_schedule(1000), [0, 1, 499, 999],
                                       torch.float32, (4, 1, 8, 8)),
                                      (diffusion.cosine_schedule(100), [99, 0, 50],
                                       torch.float64, (3, 2, 4, 4)),
                                      (diffusion.offset_cosine_schedule(10), [9, 0],
                                       torch.float32, (2, 1, 5, 5))):
        x_prev = _randn(*shape, seed=len(cases), dtype=dtype)
        noise = _randn(*shape, seed=10 + len(cases), dtype=dtype)
        cases.append(Case((x_prev, torch.tensor(t), noise, schedule.betas),
                          f"for x_prev {_about(x_prev)}, t = {t} ({schedule.name} schedule, "
                          f"T = {schedule.T})"))
    mistakes = [
        ("The noise is scaled by its standard deviation sqrt(beta_t), not by the variance beta_t.",
         lambda *args: _one_step(*args, noise_root=1)),
        ("x_{t-1} is scaled by sqrt(1 - beta_t), with a square root, so that the variance stays "
         "1.", lambda *args: _one_step(*args, signal_root=1)),
        ("q(x_t | x_{t-1}) has the variance beta_t and the mean sqrt(1 - beta_t) x_{t-1}: the "
         "coefficients are standard deviations, so both need a square root.",
         lambda *args: _one_step(*args, signal_root=1, noise_root=1)),
        ("One step uses this step's alpha_t = 1 - beta_t. alpha_bar_t (the cumulative product) "
         "belongs to the shortcut q(x_t | x_0), which starts from x_0, not from x_{t-1}.",
         lambda *args: _one_step(*args, cumulative=True)),
        ("x_prev gets sqrt(1 - beta_t) and the noise sqrt(beta_t), not the other way round.",
         lambda *args: _one_step(*args, swap=True)),
        ("Off by one in t: betas[t] already belongs to code step t (code t = paper t + 1), so "
         "index it with t itself.", lambda *args: _one_step(*args, shift=1)),
    ]
    compare("my_q_step", fn, diffusion.forward_step, cases,
            (diffusion.forward_step, diffusion.q_step, diffusion.q_sample), mistakes)


# --- 06_ddpm: Algorithm 1's loss ---------------------------------------------------------------

class _GradingEps(nn.Module):
    """A small stand-in for eps_theta(x_t, t) in the loss exercise: a seeded 3x3 convolution
    plus t / 100, so that both the image it is given and the step change its output."""

    def __init__(self, channels: int, dtype: torch.dtype, seed: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1).to(dtype)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in self.conv.parameters():
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator,
                                                  dtype=dtype))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + (torch.as_tensor(t).to(x.dtype) / 100).view(-1, 1, 1, 1)


def _loss(model, x0, t, noise, alphas_cumprod, signal_root=0.5, noise_root=0.5,
          target="noise", shift=0, step_shift=0, model_input="x_t", reduce="mean_square"):
    abar = alphas_cumprod[t - shift].to(x0.dtype).view(-1, *[1] * (x0.ndim - 1))
    x_t = abar ** signal_root * x0 + (1 - abar) ** noise_root * noise
    error = model(x_t if model_input == "x_t" else x0, t + step_shift) - (
        noise if target == "noise" else x0)
    return {"mean_square": error.pow(2).mean(), "sum_square": error.pow(2).sum(),
            "mean_abs": error.abs().mean()}[reduce]


def check_ddpm_loss(fn: Callable) -> None:
    """``my_ddpm_loss(eps_model, x0, t, noise, alphas_cumprod)`` (06_ddpm) is
    :func:`course_lib.diffusion.simple_loss`, Algorithm 1's loss (Ho et al.'s L_simple): the mean
    over batch and pixels of (noise - eps_model(x_t, t))^2 with x_t = sqrt(alpha_bar_t) x0 +
    sqrt(1 - alpha_bar_t) noise, for code steps t [B] including 0 and T - 1, float32 and float64
    images, a result of their dtype that still carries the gradient to the network's
    parameters."""
    exercise = "my_ddpm_loss"
    cases = []
    for schedule, t, dtype, shape in ((diffusion.cosine_schedule(1000), [0, 250, 999, 500],
                                       torch.float32, (4, 1, 6, 6)),
                                      (diffusion.linear_schedule(100), [99, 0, 42],
                                       torch.float64, (3, 2, 4, 4))):
        model = _GradingEps(shape[1], dtype, seed=len(cases))
        x0, noise = (_randn(*shape, seed=20 + 2 * len(cases) + i, dtype=dtype) for i in (0, 1))
        cases.append(Case((model, x0, torch.tensor(t), noise, schedule.alphas_cumprod),
                          f"for x0 and noise {_about(x0)}, t = {t} ({schedule.name} schedule, "
                          f"T = {schedule.T}) and a small test network as eps_model"))
    mistakes = [
        ("The noise coefficient is sqrt(1 - alpha_bar_t): the lecture's \"Training Procedure\" "
         "slide drops its square root; Algorithm 1 has it.",
         lambda *args: _loss(*args, noise_root=1)),
        ("The coefficients of x_t are standard deviations, sqrt(alpha_bar_t) and "
         "sqrt(1 - alpha_bar_t).", lambda *args: _loss(*args, signal_root=1, noise_root=1)),
        ("The network predicts the noise: compare its output with noise, not with x0.",
         lambda *args: _loss(*args, target="x0")),
        ("Give the network the noisy x_t, not the clean x0.",
         lambda *args: _loss(*args, model_input="x0")),
        ("The network takes the code step t itself (0..T-1), as the schedule's tensors do; "
         "t + 1 is the paper's numbering.", lambda *args: _loss(*args, step_shift=1)),
        (_OFF_BY_ONE, lambda *args: _loss(*args, shift=1)),
        ("L_simple is the mean over the batch and the pixels (F.mse_loss), not the sum.",
         lambda *args: _loss(*args, reduce="sum_square")),
        ("The loss is the squared error (F.mse_loss), not the absolute error.",
         lambda *args: _loss(*args, reduce="mean_abs")),
    ]
    forbidden = (diffusion.simple_loss, diffusion.diffusion_loss, diffusion.q_sample)
    compare(exercise, fn, diffusion.simple_loss, cases, forbidden, mistakes)
    _check_trains_the_network(exercise, fn, cases[0], forbidden)


def _check_trains_the_network(exercise: str, fn: Callable, case: Case, forbidden) -> None:
    """The loss ``fn`` returns for ``case`` carries a gradient to the network's parameters."""
    loss = _call(exercise, fn, case, forbidden)
    if not loss.requires_grad:
        raise GradingError(f"{exercise}'s loss carries no gradient to the network's parameters "
                           f"{case.describe}: compute it with torch operations on the "
                           f"network's output (no torch.no_grad(), .detach() or .item()), so "
                           f"that loss.backward() trains the network.")


# --- 07_text_to_image: the two passes of guidance ---------------------------------------------

class _GradingTextEps(_GradingEps):
    """A small stand-in for eps_theta(z_t, t, text) in the guided-prediction exercise: the
    network of the loss exercise plus a per-image shift, twice the mean of the image's text
    embedding [B, D], or -0.7 for ``text=None`` (the null condition), so the two passes differ."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor | None = None
                ) -> torch.Tensor:
        shift = torch.full((len(x),), -0.7, dtype=x.dtype) if text is None else 2 * text.mean(1)
        return super().forward(x, t) + shift.to(x.dtype).view(-1, 1, 1, 1)


def check_guided_prediction(fn: Callable) -> None:
    """``my_guided_prediction(network, x_t, t, text, w)`` (07_text_to_image) is
    :func:`course_lib.imagen.guided_prediction`: the conditional pass network(x_t, t, text) and
    the unconditional pass network(x_t, t, None), combined in Imagen's convention w eps_cond +
    (1 - w) eps_uncond (the student's ``my_guided_eps`` may do that)."""
    cases = []
    for w, dtype, shape, t in ((3.0, torch.float32, (4, 1, 6, 6), [999, 500, 10, 0]),
                               (7.5, torch.float64, (3, 3, 4, 4), [0, 250, 999]),
                               (1.0, torch.float32, (2, 1, 4, 4), [100, 7]),
                               (0.0, torch.float32, (2, 1, 4, 4), [100, 7])):
        network = _GradingTextEps(shape[1], dtype, seed=len(cases))
        x_t = _randn(*shape, seed=30 + len(cases), dtype=dtype)
        text = _randn(shape[0], 5, seed=40 + len(cases), dtype=dtype)
        cases.append(Case((network, x_t, torch.tensor(t), text, w),
                          f"for w = {w:g}, x_t {_about(x_t)}, t = {t}, text embeddings "
                          f"{_about(text)} and a small test network"))
    mistakes = [
        ("The unconditional pass gives the network no prompt, network(x_t, t, None) (the learned "
         "null condition); with the prompt in both passes, guidance changes nothing.",
         lambda net, x, t, text, w: net(x, t, text)),
        ("The conditional pass gets the prompt, network(x_t, t, text); only the unconditional "
         "one gets None.", lambda net, x, t, text, w: net(x, t, None)),
        ("The unconditional pass takes None, not zeros: it is the learned null condition that "
         "training put in place of the prompt 10 % of the time; a prompt of zeros is a prompt "
         "the network never saw.",
         lambda net, x, t, text, w: w * net(x, t, text) + (1 - w) * net(x, t, 0 * text)),
        ("That is Ho & Salimans' convention, (1 + w) eps_cond - w eps_uncond; the course follows "
         "Imagen: w eps_cond + (1 - w) eps_uncond, so that w = 1 is no guidance.",
         lambda net, x, t, text, w: (1 + w) * net(x, t, text) - w * net(x, t, None)),
        ("w multiplies the conditional prediction and 1 - w the unconditional one; you swapped "
         "them.", lambda net, x, t, text, w: w * net(x, t, None) + (1 - w) * net(x, t, text)),
    ]
    compare("my_guided_prediction", fn, imagen.guided_prediction, cases,
            (imagen.guided_prediction, imagen.guided_eps), mistakes)


# --- 03_autoencoder: the reconstruction loss ---------------------------------------------------

def _reconstruction(x_hat: torch.Tensor, x: torch.Tensor, kind: str = "bce", *,
                    reduce: str = "image", swapped: bool = False, clamp: bool = True,
                    root: str = "after") -> torch.Tensor:
    """The reconstruction loss with one known slip switched on (the defaults are right)."""
    if swapped:
        x_hat, x = x, x_hat
    if kind == "bce":
        log = (lambda v: torch.log(v).clamp(min=-100)) if clamp else torch.log
        per_pixel = -(x * log(x_hat) + (1 - x) * log(1 - x_hat))
    else:
        per_pixel = (x_hat - x) ** 2
        if root == "per_pixel":
            per_pixel = per_pixel.sqrt()
    if reduce == "batch":
        value = per_pixel.mean()
    else:
        value = per_pixel.flatten(1).sum(1) if reduce == "sum" else per_pixel.flatten(1).mean(1)
    return value.sqrt() if kind == "rmse" and root == "after" else value


def check_reconstruction_loss(fn: Callable) -> None:
    """``my_reconstruction_loss(x_hat, x, kind="bce")`` (03_autoencoder) is
    :func:`course_lib.autoencoder.reconstruction_loss` for ``kind`` "bce" and "rmse": one loss
    per image [N], the mean over its pixels (all of C, H, W) of the binary cross-entropy
    -(x log x_hat + (1 - x) log(1 - x_hat)), each log clamped at -100 as PyTorch's
    binary_cross_entropy does, or the root of the mean squared error; the dtype of the inputs;
    a loss that backpropagates to x_hat. torch's binary_cross_entropy itself is not allowed."""
    exercise = "my_reconstruction_loss"
    forbidden = (autoencoder.reconstruction_loss, "aten::binary_cross_entropy")

    def pair(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32):
        return (torch.sigmoid(_randn(*shape, seed=seed, dtype=dtype) * 2),
                torch.rand(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype))

    clamp_hint = ("Clamp each log at -100 (torch.log(v).clamp(min=-100)), as PyTorch's "
                  "binary_cross_entropy does: a sigmoid output saturates to exactly 0 or 1, "
                  "and log(0) = -inf would make the loss infinite or NaN.")
    saturated = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.3, 0.8]).view(2, 1, 1, 3)
    targets = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.0, 1.0]).view(2, 1, 1, 3)
    cases = [
        Case(pair((4, 1, 32, 32), 0), "for x_hat, x [4, 1, 32, 32] (float32) and the default "
                                      "kind='bce'"),
        Case(pair((3, 1, 8, 8), 2, torch.float64), "for x_hat, x [3, 1, 8, 8] (float64), "
                                                   "kind='bce'", {"kind": "bce"}),
        Case(pair((2, 3, 4, 4), 4), "for colour images x_hat, x [2, 3, 4, 4] (float32), "
                                    "kind='bce'", {"kind": "bce"},
             hint="Average over all of an image's values, its channels too: "
                  "flatten(1).mean(1)."),
        Case((saturated, targets), "for x_hat with values of exactly 0 and 1 (a saturated "
                                   "sigmoid), x [2, 1, 1, 3], kind='bce'", {"kind": "bce"},
             hint=clamp_hint),
        Case(pair((4, 1, 32, 32), 6), "for x_hat, x [4, 1, 32, 32] (float32), kind='rmse'",
             {"kind": "rmse"}),
        Case(pair((2, 3, 4, 4), 8, torch.float64), "for colour images x_hat, x [2, 3, 4, 4] "
                                                   "(float64), kind='rmse'", {"kind": "rmse"}),
    ]
    mistakes = [
        ("Return one loss per image, shape [N]: average over each image's pixels "
         "(x.flatten(1).mean(1)), not over the whole batch.",
         lambda x_hat, x, kind="bce": _reconstruction(x_hat, x, kind, reduce="batch")),
        ("Average over the pixels, as Keras' per-pixel losses do: a mean, not a sum.",
         lambda x_hat, x, kind="bce": _reconstruction(x_hat, x, kind, reduce="sum")),
        ("x is the target and x_hat the prediction: -(x log x_hat + (1 - x) log(1 - x_hat)); "
         "you swapped them.",
         lambda x_hat, x, kind="bce": _reconstruction(x_hat, x, kind, swapped=True)),
        (clamp_hint, lambda x_hat, x, kind="bce": _reconstruction(x_hat, x, kind, clamp=False)),
        ("RMSE is the square root of the mean squared error: take .sqrt() of the per-image mean.",
         lambda x_hat, x, kind="bce": _reconstruction(x_hat, x, kind, root="none")),
        ("Take the square root after averaging the squared errors over the pixels; the root of "
         "each pixel's square is its absolute error.",
         lambda x_hat, x, kind="bce": _reconstruction(x_hat, x, kind, root="per_pixel")),
        ("Use the kind argument: kind='rmse' asks for the root mean squared error, kind='bce' "
         "for the binary cross-entropy.",
         lambda x_hat, x, kind="bce": _reconstruction(x_hat, x, "bce" if kind == "rmse"
                                                      else "rmse")),
    ]
    compare(exercise, fn, autoencoder.reconstruction_loss, cases, forbidden, mistakes)
    for case in (cases[0], cases[4]):
        x_hat = case.args[0].clone().requires_grad_()
        loss = _call(exercise, fn, Case((x_hat, case.args[1]), case.describe, case.kwargs),
                     forbidden)
        if not loss.requires_grad:
            raise GradingError(f"{exercise}'s loss carries no gradient to x_hat "
                               f"{case.describe}: compute it with torch operations on x_hat (no "
                               f"torch.no_grad(), .detach(), .item() or numpy), so that "
                               f"loss.backward() trains the autoencoder.")


# --- 10_flow_matching: the loss and one Euler step --------------------------------------------

class _GradingVelocity(nn.Module):
    """A small stand-in for v_theta(x, t) in the flow-matching exercises: 0.7 x reversed along
    the last dimension plus (1 + 2 t) times a seeded pattern, so that both x and t change its
    output; it takes t only as the notebook's models do, a tensor of one time per sample."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, seed: int):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.7, dtype=dtype))
        self.register_buffer("pattern", _randn(*shape, seed=seed, dtype=dtype))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (len(x),):
            got = f"shape {_shape(t)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise GradingError(f"the model takes t as a tensor of one time per sample, shape "
                               f"[{len(x)}], got {got}: call it as "
                               f"model(x, torch.full((len(x),), t, dtype=x.dtype)).")
        t = t.to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        return self.scale * x.flip(-1) + (1 + 2 * t) * self.pattern


def _flow_loss(model, x0, t, noise, swap=False, target="velocity", model_input="x_t",
               root=1.0, reduce="mean"):
    s = t.to(x0.dtype).view(-1, *[1] * (x0.ndim - 1))
    x_t = ((1 - s) ** root * noise + s ** root * x0 if swap
           else (1 - s) ** root * x0 + s ** root * noise)
    goal = {"velocity": noise - x0, "reversed": x0 - noise, "noise": noise, "x0": x0}[target]
    error = (model(x_t if model_input == "x_t" else x0, t) - goal) ** 2
    return error.mean() if reduce == "mean" else error.sum()


def check_flow_matching_loss(fn: Callable) -> None:
    """``my_flow_matching_loss(model, x0, t, noise)`` (10_flow_matching) is
    :func:`course_lib.flow_matching.flow_matching_loss` with the given t [B] and noise: the mean
    over the batch and every coordinate of (model(x_t, t) - (noise - x0))^2 with
    x_t = (1 - t) x0 + t noise, for images and 2-D points, t including 0 and 1, float32 and
    float64, a result of their dtype that carries the gradient to the model's parameters."""
    exercise = "my_flow_matching_loss"
    cases = []
    for shape, t, dtype in (((4, 1, 5, 5), torch.tensor([0.0, 0.25, 0.9, 1.0]), torch.float32),
                            ((6, 2), torch.linspace(0.05, 0.95, 6, dtype=torch.float64),
                             torch.float64)):
        model = _GradingVelocity(shape[1:], dtype, seed=40 + len(cases))
        x0, noise = (_randn(*shape, seed=50 + 2 * len(cases) + i, dtype=dtype) for i in (0, 1))
        t = t.to(dtype)
        cases.append(Case((model, x0, t, noise),
                          f"for x0 and noise {_about(x0)}, t = {[round(v, 2) for v in t.tolist()]} "
                          f"and a small test network as model"))
    convention = ("This course puts the data at t = 0 and the noise at t = 1: "
                  "x_t = (1 - t) x0 + t noise (papers differ; check the convention).")
    mistakes = [
        ("That is the loss of the other convention (noise at t = 0, as in Lipman et al.): here "
         "the noise is at t = 1, x_t = (1 - t) x0 + t noise, and the velocity is noise - x0.",
         lambda *args: _flow_loss(*args, swap=True, target="reversed")),
        (convention, lambda *args: _flow_loss(*args, swap=True)),
        ("The target is the velocity d x_t / dt = noise - x0: time runs from the data (t = 0) "
         "to the noise (t = 1).", lambda *args: _flow_loss(*args, target="reversed")),
        ("The network predicts the velocity noise - x0, not the noise (that is DDPM's target).",
         lambda *args: _flow_loss(*args, target="noise")),
        ("The network predicts the velocity noise - x0, not the clean x0.",
         lambda *args: _flow_loss(*args, target="x0")),
        ("Give the network the point on the path x_t = (1 - t) x0 + t noise, not the clean x0.",
         lambda *args: _flow_loss(*args, model_input="x0")),
        ("The path is linear in t, (1 - t) x0 + t noise: no square roots (those are the "
         "variance-preserving path of DDPM).", lambda *args: _flow_loss(*args, root=0.5)),
        ("The loss is the mean over the batch and every coordinate (F.mse_loss), not the sum.",
         lambda *args: _flow_loss(*args, reduce="sum")),
    ]
    forbidden = (flow_matching.flow_matching_loss, flow_matching.interpolate,
                 flow_matching.velocity_target)
    compare(exercise, fn, flow_matching.flow_matching_loss, cases, forbidden, mistakes)
    _check_trains_the_network(exercise, fn, cases[0], forbidden)


def _euler(model, x_t, t, t_next, reverse=False, late=False, unit=False, jump=False):
    v = model(x_t, torch.full((len(x_t),), t_next if late else t, dtype=x_t.dtype))
    if jump:
        return x_t - t * v
    return x_t + (-1 if unit else (t - t_next) if reverse else (t_next - t)) * v


def check_euler_step(fn: Callable) -> None:
    """``my_euler_step(model, x_t, t, t_next)`` (10_flow_matching) is
    :func:`course_lib.flow_matching.euler_update`: x_t + (t_next - t) v with
    v = model(x_t, t as a tensor [B]), one explicit Euler step of dx/dt = v down from t to
    t_next < t, for images and 2-D points in float32 and float64."""
    cases = []
    for shape, t, t_next, dtype in (((3, 1, 4, 4), 0.9, 0.6, torch.float32),
                                    ((5, 2), 0.6, 0.4, torch.float64),
                                    ((4, 2), 1.0, 0.75, torch.float32)):
        model = _GradingVelocity(shape[1:], dtype, seed=60 + len(cases))
        x_t = _randn(*shape, seed=70 + len(cases), dtype=dtype)
        cases.append(Case((model, x_t, t, t_next),
                          f"for x_t {_about(x_t)}, t = {t}, t_next = {t_next} and a small test "
                          f"network as model"))
    mistakes = [
        ("The step is (t_next - t) v: sampling runs time down from 1 (noise) to 0 (data), so "
         "the step size is negative.", lambda *args: _euler(*args, reverse=True)),
        ("Euler evaluates the velocity where the step starts, v(x_t, t), not at t_next.",
         lambda *args: _euler(*args, late=True)),
        ("Multiply the velocity by the step size t_next - t: the step is not a whole unit of "
         "time.", lambda *args: _euler(*args, unit=True)),
        ("x_t - t v is the jump to t = 0 (the x0 estimate); one step goes to t_next only: "
         "x_t + (t_next - t) v.", lambda *args: _euler(*args, jump=True)),
    ]
    forbidden = (flow_matching.euler_step, flow_matching.euler_update, flow_matching.heun_step)
    compare("my_euler_step", fn, flow_matching.euler_update, cases, forbidden, mistakes)




# --- 10_flow_matching: a model graded by its quality -------------------------------------------

FID_BANDS = ((10.0, 4.0), (20.0, 3.0), (35.0, 2.0), (60.0, 1.0))  # (FID at most, points)
MAX_PARAMETERS = 1_000_000  # the course U-Net has 0.51M


@dataclass
class QualityGrade:
    points: float
    fid: float | None
    message: str


def band_points(fid: float) -> float:
    """The points of the first band of :data:`FID_BANDS` whose limit ``fid`` is within; 0 above
    them all."""
    return next((points for limit, points in FID_BANDS if fid <= limit), 0.0)


def grade_flow_checkpoint(path, samples: int = 1000, steps: int = 10, seed: int = 0
                          ) -> QualityGrade:
    """The quality-graded exercise of 10_flow_matching: the submitted flow-matching checkpoint
    ``path``, loaded through the verified loader (its sha256 against the manifest beside it,
    weights only), draws ``samples`` images with ``steps`` Euler steps from ``seed`` (the noise
    of the course's NFE table); their FID against the 10,000 test images in the course
    classifier's features earns the points of the first band of :data:`FID_BANDS` it is within.
    A missing, tampered or oversized model earns 0 points, and the message says why."""
    from pathlib import Path

    from course_lib.checkpoint import CheckpointError
    from course_lib.data import load_fashion_mnist
    from course_lib.experiments.flow import flow_images, load_flow

    path = Path(path)
    if not path.is_file():
        return QualityGrade(0.0, None, f"0 points: no checkpoint at {path}. Train your model "
                                       f"(TRAIN_MY_MODEL = True) and submit the file with the "
                                       f"manifest.json beside it.")
    try:
        model = load_flow(path)
    except (CheckpointError, ValueError, KeyError) as error:
        return QualityGrade(0.0, None, f"0 points: {path} cannot be graded: {error}")
    size = sum(p.numel() for p in model.parameters())
    if size > MAX_PARAMETERS:
        return QualityGrade(0.0, None, f"0 points: the network has {size:,} parameters, more "
                                       f"than the assignment's {MAX_PARAMETERS:,}.")
    features = metrics.ClassifierFeatures()
    images = flow_images(model, samples, steps, "euler", seed, 100, torch.device("cpu"))
    fid = round(metrics.fid_from_features(features((images + 1) / 2),
                                          features(load_fashion_mnist("test")[0])), 3)
    points = band_points(fid)
    bands = ", ".join(f"FID <= {limit:g}: {p:g}" for limit, p in FID_BANDS)
    return QualityGrade(points, fid, f"{points:g} point{'' if points == 1 else 's'}: FID {fid} of "
                                     f"{samples:,} samples "
                                     f"({steps} Euler steps, seed {seed}) against the test set "
                                     f"({bands}; above: 0).")


# --- 11_latent_diffusion -------------------------------------------------------------------------

def check_latent_scale(fn: Callable) -> None:
    """``my_latent_scale(latents)`` (11_latent_diffusion) is
    :func:`course_lib.latent.scale_factor`: s = 1 / std over every number of a batch of
    latents, one number that gives s * z unit variance."""
    spread = torch.tensor([1.0, 5.0]).view(1, 2, 1, 1)
    cases = [Case((_randn(64, 4, 8, 8, seed=80) * 3 + 0.5,),
                  "for latents [64, 4, 8, 8] (float32) with mean 0.5 and standard deviation 3"),
             Case((_randn(32, 4, 8, 8, seed=81, dtype=torch.float64) * 0.2,),
                  "for latents [32, 4, 8, 8] (float64) with standard deviation 0.2"),
             Case((_randn(64, 2, 8, 8, seed=82) * spread - 1,),
                  "for latents [64, 2, 8, 8] (float32) whose two channels spread 1 and 5")]
    mistakes = [
        ("s is 1 / std: the factor that divides the latents by their spread, not the standard "
         "deviation itself.", lambda z: z.double().std().item()),
        ("Take the square root: s = 1 / std, not 1 / variance.",
         lambda z: 1 / z.double().var().item()),
        ("One s for the whole batch: the standard deviation over every number (z.std()), not a "
         "mean of per-channel standard deviations.",
         lambda z: (1 / z.double().std(dim=(0, 2, 3))).mean().item()),
        ("Measure the spread around the mean (the standard deviation), not the root mean "
         "square of the latents.", lambda z: 1 / z.double().pow(2).mean().sqrt().item()),
    ]
    compare("my_latent_scale", fn, latent.scale_factor, cases, (latent.scale_factor,), mistakes,
            rtol=1e-4, atol=0.0)


def check_latent_decode(fn: Callable) -> None:
    """``my_decode(autoencoder, z0, s)`` (11_latent_diffusion) is
    :func:`course_lib.latent.decode_latents`: the generative model's scaled latents z0, divided
    by s, through the autoencoder's decoder."""
    with torch.random.fork_rng():
        torch.manual_seed(90)
        model = latent.LatentAutoencoder(width=4).eval()
    cases = [Case((model, _randn(3, 4, 8, 8, seed=91), 0.4),
                  "for 3 scaled latents [3, 4, 8, 8], s = 0.4 and a small test autoencoder"),
             Case((model, _randn(2, 4, 8, 8, seed=92) * 2, 2.5),
                  "for 2 scaled latents [2, 4, 8, 8], s = 2.5 and a small test autoencoder")]
    mistakes = [
        ("Undo the scale before decoding: the generative model learnt s * z, so the decoder "
         "takes z0 / s, not z0 * s.", lambda m, z, s: m.decode(z * s)),
        ("The decoder takes the unscaled latent z0 / s, not the generative model's z0.",
         lambda m, z, s: m.decode(z)),
    ]
    compare("my_decode", fn, latent.decode_latents, cases, (latent.decode_latents,), mistakes)
