"""Generative adversarial networks (Goodfellow et al. 2014) and DCGAN (Radford et al. 2016).

D is a binary classifier of real (label 1) against generated (label 0) images; G maps
z ~ N(0, I) to images. Every loss is written from D's *logits* l (D(x) = sigmoid(l)) with
softplus, so it stays finite when D is confident:

    -log D(x)       = softplus(-l)          -log(1 - D(x)) = softplus(l)

- discriminator: the mean of the two binary cross-entropies, real -> 1 and fake -> 0 (d2l's
  ``update_D`` halves their sum the same way);
- saturating generator loss (Goodfellow's minimax): G minimizes log(1 - D(G(z))) = -softplus(l),
  whose gradient sigmoid(l) vanishes when D rejects the fakes (l -> -inf);
- non-saturating generator loss (Goodfellow's fix): G minimizes -log D(G(z)) = softplus(-l).

The shipped DCGAN's recipe, trainer and loader are in :mod:`course_lib.experiments.dcgan`.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.checks import check_batch

from course_lib.train import History, fit


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor,
                       reduction: str = "mean") -> torch.Tensor:
    """(BCE(D(x), 1) + BCE(D(G(z)), 0)) / 2 = (softplus(-l_real) + softplus(l_fake)) / 2."""
    return (_reduce(F.softplus(-real_logits), reduction)
            + _reduce(F.softplus(fake_logits), reduction)) / 2


def generator_loss(fake_logits: torch.Tensor, saturating: bool = False,
                   reduction: str = "mean") -> torch.Tensor:
    """Non-saturating -log D(G(z)) = softplus(-l) (default), or the saturating
    log(1 - D(G(z))) = -softplus(l) of the original minimax game."""
    values = -F.softplus(fake_logits) if saturating else F.softplus(-fake_logits)
    return _reduce(values, reduction)


def r1_penalty(net_D: nn.Module, x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mescheder et al. (2018), Eq. 9: R1 = gamma / 2 * E_x[ ||grad_x l(x)||^2 ] over real x,
    with l = D's logit. It keeps D flat on the data, so that D cannot push G off a mode by an
    ever steeper slope; differentiable, so D's step minimizes it."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(net_D(x).sum(), x, create_graph=True)  # [N, ...] like x
    return gamma / 2 * grad.square().flatten(1).sum(1).mean()


def update_D(x: torch.Tensor, z: torch.Tensor, net_G: nn.Module, net_D: nn.Module,
             opt_D: torch.optim.Optimizer, reduction: str = "mean", r1_gamma: float = 0.0
             ) -> torch.Tensor:
    """One gradient step of D on a real batch x and fakes G(z) (G is not updated), plus
    :func:`r1_penalty` when ``r1_gamma`` > 0. Returns the classification loss alone."""
    opt_D.zero_grad(set_to_none=True)
    loss = discriminator_loss(net_D(x), net_D(net_G(z).detach()), reduction)
    (loss + r1_penalty(net_D, x, r1_gamma) if r1_gamma > 0 else loss).backward()
    opt_D.step()
    return loss.detach()


def update_G(z: torch.Tensor, net_G: nn.Module, net_D: nn.Module, opt_G: torch.optim.Optimizer,
             saturating: bool = False, reduction: str = "mean") -> torch.Tensor:
    """One gradient step of G through the current D (D's gradients are computed, not applied)."""
    opt_G.zero_grad(set_to_none=True)
    loss = generator_loss(net_D(net_G(z)), saturating, reduction)
    loss.backward()
    opt_G.step()
    return loss.detach()


def gan_step(x: torch.Tensor, net_G: nn.Module, net_D: nn.Module, opt_G: torch.optim.Optimizer,
             opt_D: torch.optim.Optimizer, latent_dim: int, saturating: bool = False,
             r1_gamma: float = 0.0) -> dict[str, torch.Tensor]:
    """Goodfellow et al.'s Algorithm 1 with k = 1: one D step (with an R1 penalty of weight
    ``r1_gamma`` if > 0), then one G step on the same z. Returns both losses and the mean D(x)
    and D(G(z)) after the steps."""
    z = torch.randn(len(x), latent_dim, device=x.device)
    loss_D = update_D(x, z, net_G, net_D, opt_D, r1_gamma=r1_gamma)
    loss_G = update_G(z, net_G, net_D, opt_G, saturating)
    with torch.no_grad():
        d_real, d_fake = torch.sigmoid(net_D(x)).mean(), torch.sigmoid(net_D(net_G(z))).mean()
    return {"loss_D": loss_D, "loss_G": loss_G, "D(x)": d_real, "D(G(z))": d_fake}


def train_gan(net_G: nn.Module, net_D: nn.Module, batches, steps: int,
              opt_G: torch.optim.Optimizer, opt_D: torch.optim.Optimizer, latent_dim: int,
              saturating: bool = False, history: History | None = None, desc: str = "GAN"
              ) -> History:
    """``steps`` of :func:`gan_step` on the batches of a :class:`~course_lib.train.Minibatches`;
    call again with the same objects (and ``history``) to go on training."""
    return fit(lambda batch: gan_step(batch[0], net_G, net_D, opt_G, opt_D, latent_dim,
                                      saturating),
               batches, steps, desc=desc, live_plot=False, history=history)


def train_discriminator(net_G: nn.Module, net_D: nn.Module, batches, steps: int,
                        opt_D: torch.optim.Optimizer, latent_dim: int) -> torch.Tensor:
    """``steps`` of :func:`update_D` against a fixed G, each on the next real batch and as many
    fakes G(z), z ~ N(0, I): D approaches Proposition 1's optimal D* for this G. Returns the
    discriminator losses [steps]."""
    losses = []
    for _ in range(steps):
        (x,) = next(batches)
        z = torch.randn(len(x), latent_dim, device=x.device)
        losses.append(update_D(x, z, net_G, net_D, opt_D))
    return torch.stack(losses) if losses else torch.zeros(0)


def toy_networks(latent_dim: int = 2, data_dim: int = 2) -> tuple[nn.Module, nn.Module]:
    """d2l's pair for its 2-D Gaussian: a linear generator and an MLP 2-5-3-1 with tanh."""
    net_G = nn.Sequential(nn.Linear(latent_dim, data_dim))
    net_D = nn.Sequential(nn.Linear(data_dim, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(),
                          nn.Linear(3, 1))
    return net_G, net_D


def mlp_networks(latent_dim: int, data_dim: int, hidden: int = 128, pack: int = 1
                 ) -> tuple[nn.Module, nn.Module]:
    """A generator and a discriminator with two hidden layers each (ReLU in G, LeakyReLU(0.2)
    in D), the usual pair of the mixture-of-Gaussians benchmarks. With ``pack`` > 1 the
    discriminator is :class:`Packed`."""
    net_G = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                          nn.ReLU(), nn.Linear(hidden, data_dim))
    net_D = nn.Sequential(nn.Linear(data_dim * pack, hidden), nn.LeakyReLU(0.2),
                          nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
    return net_G, (Packed(net_D, pack) if pack > 1 else net_D)


class Packed(nn.Module):
    """PacGAN (Lin et al. 2018): the discriminator judges ``pack`` samples of the same kind at
    once, so a generator that repeats itself is easy to spot. [N, d] -> [N / pack] logits."""

    def __init__(self, net: nn.Module, pack: int):
        super().__init__()
        self.net, self.pack = net, pack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) % self.pack:
            raise ValueError(f"a discriminator packing {self.pack} samples needs a batch size "
                             f"divisible by {self.pack}, got {len(x)}")
        return self.net(x.reshape(len(x) // self.pack, -1)).flatten()  # [N/pack, pack*d]


def generator_gradient_norm(net_G: nn.Module, net_D: nn.Module, z: torch.Tensor,
                            saturating: bool) -> float:
    """The L2 norm of the generator loss's gradient over all of G's parameters (nothing is
    stored in ``.grad``): how hard the current D pushes G."""
    params = [p for p in net_G.parameters() if p.requires_grad]
    grads = torch.autograd.grad(generator_loss(net_D(net_G(z)), saturating), params)
    return torch.cat([g.flatten() for g in grads]).norm().item()


def optimal_discriminator(p_data: torch.Tensor, p_g: torch.Tensor) -> torch.Tensor:
    """Goodfellow et al., Proposition 1: for a fixed G the best D is
    D*(x) = p_data(x) / (p_data(x) + p_g(x)) (NaN where both densities are 0)."""
    if p_data.shape != p_g.shape or bool((p_data < 0).any() | (p_g < 0).any()):
        raise ValueError(f"need two non-negative densities on the same points, got shapes "
                         f"{tuple(p_data.shape)} and {tuple(p_g.shape)}")
    return p_data / (p_data + p_g)


def dirac_gan(steps: int, lr: float = 0.1, simultaneous: bool = True, saturating: bool = True,
              theta: float = 1.0, psi: float = 1.0) -> torch.Tensor:
    """The Dirac-GAN of Mescheder et al. (2018): data is the point 0, G(z) = theta for every z,
    D(x) = sigmoid(psi * x); the only equilibrium is theta = psi = 0. Runs ``steps`` of SGD on
    the course's :func:`update_D` / :func:`update_G` (by default with the minimax, saturating
    generator loss that Mescheder et al. analyse), both players on the same parameters
    (``simultaneous``) or D first and G against the new D (alternating). Returns the path
    [steps + 1, 2] of (theta, psi)."""
    net_G, net_D = _Constant(theta), nn.Linear(1, 1, bias=False)
    nn.init.constant_(net_D.weight, psi)
    opt_G, opt_D = torch.optim.SGD(net_G.parameters(), lr), torch.optim.SGD(net_D.parameters(), lr)
    x, z = torch.zeros(1, 1), torch.zeros(1, 1)
    path = [(theta, psi)]
    for _ in range(steps):
        old_D = copy.deepcopy(net_D) if simultaneous else net_D
        update_D(x, z, net_G, net_D, opt_D)
        update_G(z, net_G, old_D, opt_G, saturating)
        path.append((net_G.theta.item(), net_D.weight.item()))
    return torch.tensor(path)


class _Constant(nn.Module):
    def __init__(self, theta: float):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.theta.expand(len(z), 1)


def interpolate_latents(z0: torch.Tensor, z1: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` latents from z0 to z1 along the great circle (spherical interpolation, White
    2016), which keeps the norm a Gaussian latent typically has; [latent_dim] x 2 ->
    [steps, latent_dim]."""
    if z0.shape != z1.shape or z0.ndim != 1:
        raise ValueError(f"need two latent vectors of the same size, got {tuple(z0.shape)} and "
                         f"{tuple(z1.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps (latents from z0 to z1, both ends included) must be an int "
                         f">= 2, got {steps!r}")
    omega = torch.arccos((z0 / z0.norm()).dot(z1 / z1.norm()).clamp(-1, 1))
    s = torch.linspace(0, 1, steps, dtype=z0.dtype)[:, None]  # [steps, 1]
    if omega < 1e-6:
        return (1 - s) * z0 + s * z1
    return (torch.sin((1 - s) * omega) * z0 + torch.sin(s * omega) * z1) / torch.sin(omega)


def nearest_images(queries: torch.Tensor, references: torch.Tensor, k: int = 3
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Foster's memorisation check: for each query image, the ``k`` reference images nearest to
    it in pixel space (Euclidean distance over all pixels), nearest first. Images [N, C, H, W]
    and [M, C, H, W] -> (distances [N, k], indices into ``references`` [N, k])."""
    if queries.ndim != 4 or references.ndim != 4 or queries.shape[1:] != references.shape[1:]:
        raise ValueError(f"need two image batches [N, C, H, W] of the same image size, got "
                         f"{tuple(queries.shape)} and {tuple(references.shape)}")
    if not 1 <= k <= len(references):
        raise ValueError(f"k must be in 1..{len(references)} (the reference images), got {k}")
    distances = torch.cdist(queries.flatten(1).float(), references.flatten(1).float())  # [N, M]
    nearest = distances.topk(k, dim=1, largest=False)                     # sorted, nearest first
    return nearest.values, nearest.indices


def _stages(image_size: int) -> tuple[int, int]:
    """image_size = start * 2^k with start 4 (32, 64) or 7 (28): returns (start, k)."""
    for start in (4, 7):
        k = math.log2(image_size / start)
        if k >= 1 and k == int(k):
            return start, int(k)
    raise ValueError(f"DCGAN image_size must be 4 or 7 times a power of two (28, 32, 64), "
                     f"got {image_size}")


def generator_block(c_in: int, c_out: int, kernel_size: int = 4, stride: int = 2,
                    padding: int = 1) -> nn.Sequential:
    """DCGAN's generator block: ConvTranspose2d (no bias, BatchNorm has one) + BatchNorm + ReLU;
    the defaults double the height and width: H_out = (H - 1) * 2 - 2 + 4 = 2H."""
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, kernel_size, stride, padding, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


def discriminator_block(c_in: int, c_out: int) -> nn.Sequential:
    """DCGAN's discriminator block: a strided Conv2d(4, stride 2, padding 1) that halves the
    height and width, BatchNorm and LeakyReLU(0.2)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.LeakyReLU(0.2))


class DCGANGenerator(nn.Module):
    """z [N, latent_dim] -> images [N, channels, S, S] in [-1, 1]: a transposed convolution to a
    start x start map, then ConvT(4, stride 2) + BatchNorm + ReLU blocks halving the channels,
    and a last ConvT to the image channels with tanh. image_size=64, channels=3, base=64,
    latent_dim=100 is d2l's configuration."""

    def __init__(self, latent_dim: int = 100, channels: int = 1, image_size: int = 32,
                 base: int = 64):
        super().__init__()
        self.latent_dim, self.channels, self.image_size = latent_dim, channels, image_size
        start, k = _stages(image_size)
        width = base * 2 ** (k - 1)
        layers = [*generator_block(latent_dim, width, kernel_size=start, stride=1, padding=0)]
        for _ in range(k - 1):                                              # doubles the size
            layers += generator_block(width, width // 2)
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        check_batch(z, (self.latent_dim,), "latents", dtype=self.net[0].weight.dtype)
        return self.net(z[:, :, None, None])  # [N, latent_dim, 1, 1] -> images


class DCGANDiscriminator(nn.Module):
    """images [N, channels, S, S] in [-1, 1] -> logits [N]: Conv(4, stride 2) + BatchNorm +
    LeakyReLU(0.2) blocks doubling the channels down to start x start, then a start x start
    convolution to one logit (d2l's D with image_size=64, channels=3, base=64)."""

    def __init__(self, channels: int = 1, image_size: int = 32, base: int = 64):
        super().__init__()
        self.channels, self.image_size = channels, image_size
        start, k = _stages(image_size)
        layers, c_in, width = [], channels, base
        for _ in range(k):                                                  # halves the size
            layers += discriminator_block(c_in, width)
            c_in, width = width, width * 2
        layers += [nn.Conv2d(c_in, 1, start, bias=False)]                   # [N, 1, 1, 1]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, (self.channels, self.image_size, self.image_size),
                    dtype=self.net[0].weight.dtype)
        low, high = x.min().item(), x.max().item()
        if low < -1.001 or high > 1.001:
            raise ValueError(f"expected images in [-1, 1] (the generator's tanh range), got "
                             f"values in [{low:.3g}, {high:.3g}]; map [0, 1] images with x * 2 - 1")
        return self.net(x).flatten()


def dcgan_init(module: nn.Module) -> None:
    """Radford et al.: convolution weights ~ N(0, 0.02); BatchNorm scale ~ N(1, 0.02), shift 0.
    Use as ``model.apply(dcgan_init)``."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
