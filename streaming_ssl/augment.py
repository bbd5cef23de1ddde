"""Batched multi-patch augmentation for EMP-SSL, on the training device.

For a batch of B images, :class:`MultiPatchAugment` draws ``n`` patches per image and augments all
``n * B`` of them at once with per-patch random parameters, the way VICReg / EMP-SSL do it with
torchvision, but with tensor ops only (no PIL, no loop over samples):

1. random crop of a fixed fraction ``crop_area`` of the image area (aspect ratio log-uniform in
   ``crop_ratio``), integer size and position fully inside the image, resized to ``out_size``
   with bilinear interpolation (a single ``grid_sample`` call for the whole batch);
2. horizontal flip (folded into the sampling grid, so it costs nothing);
3. colour jitter (brightness, contrast, saturation, hue) in a random order per patch;
4. grayscale;
5. Gaussian blur (separable, reflect padding, a kernel covering +-3 sigma: the sigma asked is the sigma applied, as
   with the authors' PIL blur, also on 32 px patches);
6. solarize;
7. per-channel normalisation.

Layout is PATCH-MAJOR everywhere: row ``i * B + b`` of the output (and of every returned parameter)
is patch ``i`` of image ``b``.

Implementation notes
--------------------
* The crop is sampled exactly like crop-then-resize (``align_corners=False``): sample positions are
  clamped to the crop box, so nothing outside the crop leaks in. Downscaling crops are not
  anti-aliased (``grid_sample`` has no antialias); with the EMP-SSL defaults crops are always
  upscaled, where antialiasing makes no difference.
* Brightness, contrast and saturation are all blends ``clamp(f * x + (1 - f) * t)`` with
  ``t = 0``, the mean grey level, or the grey image. At jitter step ``k`` every patch takes the
  blend of its ``k``-th op, with ``f = 1`` (an exact identity) where that op is hue or the patch is
  not jittered, so each step is one fused pass over the batch. Hue (the expensive op) is computed
  only on the patches that apply it at that step.
* Grey levels use ITU-R 601-2 luma (0.299, 0.587, 0.114); torchvision's tensor code uses 0.2989 for
  red, a difference below 1e-4 per pixel.
* Two ways to apply the ops that act on a random subset of patches (hue, gray, blur, solarize), with
  the same result. On the CPU (compute-bound) each op runs on its selected patches only; their index
  sets cost one host synchronisation per call. On an accelerator (CUDA) each op runs on every patch and
  a mask selects its result (``torch.where``): a few more memory-bound passes, but no host
  synchronisation, so the host can queue the next update while the device works (``sync_free``).
* ``compiled=True`` runs everything after the random draw (a pure function of the images and the uniforms, masked
  path) through ``torch.compile``: on a GPU, the few hundred small kernels of one call become a few fused ones
  (the host launches fewer). The random draw stays eager, so the patches are those of the eager pipeline up to
  float32 rounding of the fused arithmetic (about 1e-5) and the generator advances the same way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import operator
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from streaming_ssl.device import compile_backends, no_autocast

logger = logging.getLogger(__name__)

__all__ = ["MultiPatchAugment", "adjust_hue", "adjust_hue_", "blend_jitter", "gaussian_blur", "rgb_to_gray", "solarize"]

_LUMA = (0.299, 0.587, 0.114)

# Op ids of the colour jitter, in the order of ``MultiPatchAugment.jitter``.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3

# Columns of the uniform random matrix drawn once per call (one column per per-patch variable).
_U_RATIO, _U_TOP, _U_LEFT, _U_FLIP = 0, 1, 2, 3
_U_JITTER, _U_BRIGHT, _U_CONTRAST, _U_SAT, _U_HUE = 4, 5, 6, 7, 8
_U_ORDER = slice(9, 13)
_U_GRAY, _U_BLUR, _U_SIGMA, _U_SOLARIZE = 13, 14, 15, 16
_N_UNIFORMS = 17


# --------------------------------------------------------------------------------------------------
# Batched functional ops on float images in [0, 1], shape (N, 3, H, W)
# --------------------------------------------------------------------------------------------------


def rgb_to_gray(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """ITU-R 601-2 luma of RGB images.

    Args:
        x: float (N, 3, H, W).
        out: optional float (N, 1, H, W) buffer to write into.

    Returns:
        float (N, 1, H, W) (``out`` if given).
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    out = torch.mul(r, _LUMA[0], out=out) if out is not None else r.mul(_LUMA[0])
    return out.add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2])


def blend_jitter(
    x: torch.Tensor, op: torch.Tensor, factor: torch.Tensor, workspace: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply brightness, contrast or saturation per image, IN PLACE, in one fused pass.

    Image ``j`` gets ``clamp(f_j * x_j + (1 - f_j) * t_j, 0, 1)`` with ``t_j = 0`` for brightness
    (``op == 0``), the mean of its grey image for contrast (``op == 1``) and its grey image for
    saturation (``op == 2``), i.e. the semantics of torchvision's ``adjust_brightness``,
    ``adjust_contrast`` and ``adjust_saturation``. Images with another op id or ``f_j == 1`` are
    left unchanged (up to the final clamp, a no-op on values in [0, 1]).

    Args:
        x: float (N, 3, H, W) in [0, 1]; modified in place and returned.
        op: integer (N,) op id per image.
        factor: float (N,) blend factor per image.
        workspace: optional float (N, 1, H, W) scratch buffer (saves an allocation per call).

    Returns:
        ``x``.
    """
    f = torch.where(op <= _SATURATION, factor, torch.ones_like(factor))
    one_minus_f = 1.0 - f
    gray = rgb_to_gray(x, out=workspace)  # (N, 1, H, W)
    coef_gray = torch.where(op == _SATURATION, one_minus_f, torch.zeros_like(f))
    coef_mean = torch.where(op == _CONTRAST, one_minus_f, torch.zeros_like(f)) * gray.mean(dim=(1, 2, 3))
    # offset = (1 - f) * target, shape (N, 1, H, W), computed in the grey buffer
    offset = gray.mul_(coef_gray.view(-1, 1, 1, 1)).add_(coef_mean.view(-1, 1, 1, 1))
    torch.addcmul(offset, x, f.view(-1, 1, 1, 1), out=x).clamp_(0.0, 1.0)
    return x


def adjust_hue_(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image, IN PLACE (RGB -> HSV -> RGB, like torchvision's ``adjust_hue``).

    Value (max) and chroma (max - min) of every pixel are kept and its hue ``h`` (in sextants,
    [0, 6)) is shifted; channel ``c`` becomes ``max - chroma * f_c(h)`` with the trapezoid waves
    ``f_R = clamp(2 - |h - 3|, 0, 1)``, ``f_G = clamp(|h - 2| - 1, 0, 1)``,
    ``f_B = clamp(|h - 4| - 1, 0, 1)``, which is the HSV -> RGB map without divisions by ``v``.
    Branches are done with exact 0/1 arithmetic masks (``sign``) rather than ``where``.

    Args:
        x: float (N, 3, H, W) in [0, 1]; overwritten with the result.
        hue: float (N,) shift per image, in turns (in [-0.5, 0.5]; 1/3 maps red to green).

    Returns:
        ``x``.
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    maxc = x.amax(dim=1, keepdim=True)  # (N, 1, H, W)
    minc = x.amin(dim=1, keepdim=True)
    chroma = maxc - minc
    not_r = (maxc - r).sign_()  # 0 where red is the max, else 1
    not_g = (maxc - g).sign_()  # 0 where green is the max, else 1
    h_r = g - b  # hue numerators of the three branches (times chroma)
    h_g = (b - r).add_(chroma, alpha=2.0)
    h_b = (r - g).add_(chroma, alpha=4.0)
    # red max -> h_r; else green max -> h_g; else h_b
    h = h_b.sub_(h_g).mul_(not_g).add_(h_g).sub_(h_r).mul_(not_r).add_(h_r)
    h = h.div_(chroma.clamp(min=torch.finfo(x.dtype).tiny)).add_(hue.view(-1, 1, 1, 1).to(x.dtype), alpha=6.0)
    h = h.sub_(torch.floor(h * (1.0 / 6.0)).mul_(6.0))  # mod 6
    centre, sign, offset = _hue_waves(x)
    torch.sub(h, centre, out=x)
    x.abs_().mul_(sign).add_(offset).clamp_(0.0, 1.0)  # f_c(h)
    return x.mul_(chroma).neg_().add_(maxc).clamp_(0.0, 1.0)


def _hue_waves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre, sign and offset (each (1, 3, 1, 1)) of the trapezoid waves f_c(h) = sign |h - centre| + offset."""
    if torch.compiler.is_compiling():  # constants of the compiled graph (the compiler does not trace the cache)
        return _hue_wave_values(x.device, x.dtype)
    return _hue_wave_constants(x.device, x.dtype)


def _hue_wave_values(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    vals = torch.tensor([[3.0, 2.0, 4.0], [-1.0, 1.0, 1.0], [2.0, -1.0, -1.0]], device=device, dtype=dtype)
    c, s, o = vals.view(3, 1, 3, 1, 1).unbind(0)
    return c, s, o


# cached so that the host -> device copy happens once per device, not once per call
_hue_wave_constants = functools.lru_cache(maxsize=16)(_hue_wave_values)


def adjust_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Out-of-place :func:`adjust_hue_`: float (N, 3, H, W) in [0, 1], (N,) shifts in turns -> new (N, 3, H, W)."""
    return adjust_hue_(x.clone(), hue)


def gaussian_kernel_size(out_size: int, sigma_max: float = 2.0) -> int:
    """Blur kernel size: odd, covering +-3 ``sigma_max`` (13 taps for sigma up to 2; the Gaussian's weight cut off
    is below 0.3%), at most ``2 * out_size - 1`` (reflect padding needs less than the side), at least 3.

    The authors' blur (PIL's ``GaussianBlur(sigma)``) is not truncated. torchvision's convention of a kernel of
    about 10% of the image (SimCLR's, at 224 px) would be 3 taps on a 32 px patch, where sigma 2 blurs like 0.8.
    """
    k = 2 * math.ceil(3 * float(sigma_max)) + 1
    return max(3, min(k, 2 * int(out_size) - 1))


def tenth_kernel_size(out_size: int) -> int:
    """torchvision's / SimCLR's blur kernel: the odd number near 10% of ``out_size``, at least 3 (3 at 32 px, 7 at
    64, 23 at 224). What ``blur_kernel_size=0`` selects, and what every run made before the +-3 sigma default used."""
    k = int(0.1 * out_size)
    if k % 2 == 0:
        k += 1
    return max(3, k)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma and reflect padding (torchvision semantics).

    Args:
        x: float (N, C, H, W); H and W must exceed ``kernel_size // 2``.
        sigma: float (N,) standard deviation per image, in pixels.
        kernel_size: odd kernel size.

    Returns:
        New float (N, C, H, W).
    """
    n, c, h, w = x.shape
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    kern = torch.exp(-0.5 * (t / sigma.view(-1, 1).to(x.dtype)).square())  # (N, K)
    kern = kern / kern.sum(dim=1, keepdim=True)
    kern = kern.repeat_interleave(c, dim=0)  # (N*C, K), one kernel per channel
    pad = kernel_size // 2
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect").reshape(1, n * c, h + 2 * pad, w + 2 * pad)
    y = F.conv2d(xp, kern.view(n * c, 1, 1, kernel_size), groups=n * c)  # (1, NC, H+2p, W)
    y = F.conv2d(y, kern.view(n * c, 1, kernel_size, 1), groups=n * c)  # (1, NC, H, W)
    return y.view(n, c, h, w)


def solarize(x: torch.Tensor) -> torch.Tensor:
    """Solarize at threshold 0.5: values >= 0.5 become ``1 - x`` (= ``min(x, 1 - x)`` on [0, 1]).

    Args:
        x: float (N, C, H, W) in [0, 1].

    Returns:
        New float tensor of the same shape.
    """
    return torch.minimum(x, 1.0 - x)


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _plain_float32(images: torch.Tensor) -> Iterator[None]:
    """No autograd and no autocast (the pipeline works in float32 even inside an autocast region)."""
    with torch.no_grad(), no_autocast(images.device.type):
        yield


def _check_int(name: str, value: int, minimum: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def _check_prob(name: str, p: float) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    return p


def _check_range(name: str, rng: tuple[float, float]) -> tuple[float, float]:
    if len(rng) != 2:
        raise ValueError(f"{name} must be a pair (low, high), got {rng!r}")
    lo, hi = float(rng[0]), float(rng[1])
    if not (0.0 < lo <= hi and math.isfinite(hi)):
        raise ValueError(f"{name} must satisfy 0 < low <= high < inf, got {rng!r}")
    return lo, hi


class MultiPatchAugment(torch.nn.Module):
    """EMP-SSL multi-patch augmentation, batched on the images' device.

    Args:
        n_patches: default number of patches per image (>= 1).
        out_size: side of the square output patches (>= 2).
        crop_area: fraction of the image area covered by each crop, in (0, 1]. Crop sides are rounded
            to whole pixels (and clamped to the image, which only matters for extreme ratios).
        crop_ratio: range (low, high) of the crop aspect ratio width/height, sampled log-uniformly.
        flip_p: probability of a horizontal flip.
        jitter: strengths (brightness, contrast, saturation, hue); factors are uniform in
            [max(0, 1 - s), 1 + s], the hue shift in [-h, h] (h <= 0.5). A strength of 0
            disables that op.
        jitter_p: probability of applying the colour jitter to a patch.
        gray_p: probability of converting to grayscale.
        blur_p: probability of a Gaussian blur.
        blur_sigma: range of the blur sigma, in output pixels.
        blur_kernel_size: taps of the blur kernel, odd, 3 to ``2 * out_size - 1``; ``None`` (default): enough for
            +-3 times the largest sigma (13 for sigma up to 2, :func:`gaussian_kernel_size`); 0: torchvision's 10% of
            the patch (:func:`tenth_kernel_size`), as every run made before this default (3 taps on 32 px patches,
            where sigma 2 blurs like sigma 0.8).
        solarize_p: probability of solarizing.
        mean: per-channel mean for the final normalisation.
        std: per-channel std for the final normalisation.
        sync_free: apply the subset ops by masking instead of indexing, with no host synchronisation
            (same result). ``None`` (default): on every device but the CPU.
        compiled: run :meth:`forward`'s work after the random draw through ``torch.compile`` (masked path, on
            every device; compiles at the first call and at a new batch shape). Meant for GPUs, where it saves
            kernel launches; ``sync_free=False`` cannot be combined with it.
        compile_backend: the ``torch.compile`` backend of ``compiled`` ("inductor": fused kernels; "aot_eager" or
            "eager": the same captured graph without code generation).

    ``mean`` and ``std`` are non-persistent buffers (shape (1, 3, 1, 1)): they follow ``.to(device)``
    and stay out of ``state_dict``. Move the module to the images' device to avoid a copy per call.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        n_patches: int = 20,
        out_size: int = 32,
        *,
        crop_area: float = 0.25,
        crop_ratio: tuple[float, float] = (1.0, 1.0),
        flip_p: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.2),
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        blur_p: float = 0.1,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_kernel_size: int | None = None,
        solarize_p: float = 0.1,
        mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465),
        std: tuple[float, float, float] = (0.2470, 0.2435, 0.2616),
        sync_free: bool | None = None,
        compiled: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__()
        self.n_patches = self._check_n_patches(n_patches)
        self.out_size = _check_int("out_size", out_size, 2)
        crop_area = float(crop_area)
        if not 0.0 < crop_area <= 1.0:
            raise ValueError(f"crop_area must be in (0, 1], got {crop_area}")
        self.crop_area = crop_area
        self.crop_ratio = _check_range("crop_ratio", crop_ratio)
        self.flip_p = _check_prob("flip_p", flip_p)
        if len(jitter) != 4:
            raise ValueError(f"jitter must be (brightness, contrast, saturation, hue), got {jitter!r}")
        jit = tuple(float(s) for s in jitter)
        if any(not (0.0 <= s < math.inf) for s in jit):
            raise ValueError(f"jitter strengths must be finite and >= 0, got {jitter!r}")
        if jit[3] > 0.5:
            raise ValueError(f"jitter hue strength must be <= 0.5, got {jit[3]}")
        self.jitter: tuple[float, float, float, float] = jit  # type: ignore[assignment]
        self.jitter_p = _check_prob("jitter_p", jitter_p)
        self.gray_p = _check_prob("gray_p", gray_p)
        self.blur_p = _check_prob("blur_p", blur_p)
        self.blur_sigma = _check_range("blur_sigma", blur_sigma)
        self.solarize_p = _check_prob("solarize_p", solarize_p)
        if len(mean) != 3:
            raise ValueError(f"mean must have 3 entries, got {mean!r}")
        if len(std) != 3 or any(not float(s) > 0 for s in std):
            raise ValueError(f"std must have 3 positive entries, got {std!r}")
        if sync_free not in (None, True, False):
            raise ValueError(f"sync_free must be None, True or False, got {sync_free!r}")
        self.sync_free = sync_free
        if compiled not in (True, False):
            raise ValueError(f"compiled must be True or False, got {compiled!r}")
        if compiled and sync_free is False:
            raise ValueError("compiled=True compiles the masked path, so it cannot be combined with sync_free=False; "
                             "set sync_free=None (or True), or compiled=False")
        self.compiled = bool(compiled)
        if compiled and compile_backend not in compile_backends():
            raise ValueError(f"compile_backend {compile_backend!r} is not a torch.compile backend; valid: "
                             f"{', '.join(compile_backends())}")
        self.compile_backend = compile_backend
        if blur_kernel_size is None:
            self.blur_kernel_size = gaussian_kernel_size(self.out_size, self.blur_sigma[1])
        elif blur_kernel_size == 0 and not isinstance(blur_kernel_size, bool):
            self.blur_kernel_size = tenth_kernel_size(self.out_size)  # (always below 2 * out_size)
        else:
            k = _check_int("blur_kernel_size", blur_kernel_size, 3)
            if k % 2 == 0 or k > 2 * self.out_size - 1:
                raise ValueError(f"blur_kernel_size must be odd and at most 2 * out_size - 1 = {2 * self.out_size - 1}"
                                 f" (reflect padding), got {k}")
            self.blur_kernel_size = k
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([float(s) for s in std]).view(1, 3, 1, 1), persistent=False)
        logger.debug("built %s(%s)", type(self).__name__, self.extra_repr())

    # ---------------------------------------------------------------------------------------------
    # public API
    # ---------------------------------------------------------------------------------------------

    def forward(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        n_patches: int | None = None,
        return_params: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Augment ``n`` random patches of every image.

        Args:
            images: uint8 (B, 3, H, W), or float in [0, 1].
            generator: source of all randomness, on ``images.device`` (on another device the uniforms are
                drawn there and copied over). ``None`` uses the global RNG of that device.
            n_patches: patches per image; defaults to ``self.n_patches``.
            return_params: also return the per-patch parameters.

        Returns:
            Contiguous float32 (n*B, 3, out_size, out_size), normalised, patch-major (row
            ``i * B + b`` is patch ``i`` of image ``b``). With ``return_params``, also a dict of
            patch-major tensors of length n*B: ``crop_box`` (n*B, 4) float as (top, left, height,
            width) in input pixels; bool masks ``flip``, ``jitter``, ``gray``, ``blur``,
            ``solarize``; the sampled ``brightness``, ``contrast``, ``saturation`` factors, ``hue``
            shift and ``jitter_order`` (n*B, 4) (op ids 0..3 in the order brightness, contrast,
            saturation, hue), which act only where ``jitter`` is True; the sampled ``sigma``,
            which acts only where ``blur`` is True.
        """
        n = self.n_patches if n_patches is None else self._check_n_patches(n_patches)
        self._check_images(images)
        with _plain_float32(images):
            u = self._uniforms(images, n, generator)
            if self.compiled:
                out, params = _compiled_patches(self.compile_backend)(self, images, u, n)
            else:
                out, params = self.patches_from_uniforms(images, u, n)
        if return_params:
            return out, params
        return out

    def patches_from_uniforms(
        self, images: torch.Tensor, u: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`forward`'s work after the random draw, eager: a pure function of the images and the uniforms.

        Args:
            images: uint8 (B, 3, H, W), or float in [0, 1].
            u: float32 (n*B, 17) uniforms in [0, 1), one row per patch (patch-major), on the images' device.
            n: patches per image.

        Returns:
            The patches and the per-patch parameters, as :meth:`forward` with ``return_params``.
        """
        if u.shape != (n * images.shape[0], _N_UNIFORMS) or u.device != images.device:
            raise ValueError(f"u must be ({n} * {images.shape[0]}, {_N_UNIFORMS}) uniforms on {images.device} (n "
                             f"patches of each image), got {tuple(u.shape)} on {u.device}")
        with _plain_float32(images):
            x = self._to_float(images)
            params = self._sample(u, x.shape[-2], x.shape[-1])
            out = self._crop_resize(x, n, params["crop_box"], params["flip"])
            self._apply_photometric(out, params)
            self._normalize_(out)
        return out, params

    def whole_image(self, images: torch.Tensor) -> torch.Tensor:
        """The whole images, resized (bilinear, antialiased) to ``out_size`` if needed, normalised.

        Deterministic; meant for linear / kNN probes.

        Args:
            images: uint8 (B, 3, H, W), or float in [0, 1].

        Returns:
            New contiguous float32 (B, 3, out_size, out_size).
        """
        with _plain_float32(images):
            x = self._to_float(images)
            if x.shape[-2:] != (self.out_size, self.out_size):
                x = F.interpolate(
                    x, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False, antialias=True
                )
            mean, std = self._stats(x)
            return ((x - mean) / std).contiguous()

    def eval_patches(
        self, images: torch.Tensor, n_patches: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Random crops (+ flips) without any photometric change, normalised, for bag-of-features probes.

        The crops and flips are drawn exactly as in :meth:`forward`: with a generator in the same
        state, both calls use the same crop boxes and flips.

        Args:
            images: uint8 (B, 3, H, W), or float in [0, 1].
            n_patches: patches per image (>= 1).
            generator: source of randomness, on any device: the uniforms are drawn there and copied to
                ``images.device``, so a CPU generator gives the same crops on every device.

        Returns:
            Contiguous float32 (n*B, 3, out_size, out_size), patch-major.
        """
        n = self._check_n_patches(n_patches)
        with _plain_float32(images):
            x = self._to_float(images)
            u = self._uniforms(x, n, generator)
            params = self._sample(u, x.shape[-2], x.shape[-1])
            out = self._crop_resize(x, n, params["crop_box"], params["flip"])
            self._normalize_(out)
        return out

    def extra_repr(self) -> str:
        return (
            f"n_patches={self.n_patches}, out_size={self.out_size}, crop_area={self.crop_area}, "
            f"crop_ratio={self.crop_ratio}, flip_p={self.flip_p}, jitter={self.jitter}, jitter_p={self.jitter_p}, "
            f"gray_p={self.gray_p}, blur_p={self.blur_p}, blur_sigma={self.blur_sigma}, "
            f"blur_kernel_size={self.blur_kernel_size}, solarize_p={self.solarize_p}, sync_free={self.sync_free}, "
            f"compiled={self.compiled}" + (f", compile_backend={self.compile_backend!r}" if self.compiled else "")
        )

    # ---------------------------------------------------------------------------------------------
    # internals
    # ---------------------------------------------------------------------------------------------

    @staticmethod
    def _check_n_patches(n_patches: int) -> int:
        return _check_int("n_patches", n_patches, 1)

    @staticmethod
    def _check_images(images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("images must hold at least one image")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")

    @classmethod
    def _to_float(cls, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 or float -> float32 in [0, 1] (never modifies ``images``)."""
        cls._check_images(images)
        if images.dtype == torch.uint8:
            return images.to(torch.float32).div_(255.0)
        return images.to(torch.float32)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean.to(device=x.device, dtype=x.dtype), self.std.to(device=x.device, dtype=x.dtype)

    def _normalize_(self, x: torch.Tensor) -> None:
        mean, std = self._stats(x)
        x.sub_(mean).div_(std)

    @staticmethod
    def _uniforms(x: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """All per-patch uniforms of one call, (n*B, _N_UNIFORMS), drawn in one RNG call on the generator's device
        (x's without one) and put on x's device."""
        where = x.device if generator is None else generator.device
        u = torch.rand(n * x.shape[0], _N_UNIFORMS, generator=generator, device=where, dtype=torch.float32)
        return u.to(x.device)

    def _sample(self, u: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
        """Per-patch parameters from the uniforms ``u`` (n*B, _N_UNIFORMS)."""
        # crop: integer size of area ~ crop_area * H * W, log-uniform ratio w/h, integer position
        lo, hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        ratio = torch.exp(lo + (hi - lo) * u[:, _U_RATIO])
        area = self.crop_area * height * width
        w = torch.sqrt(area * ratio).round_().clamp_(1.0, float(width))
        h = torch.sqrt(area / ratio).round_().clamp_(1.0, float(height))
        top = torch.minimum(torch.floor(u[:, _U_TOP] * (height - h + 1.0)), height - h)
        left = torch.minimum(torch.floor(u[:, _U_LEFT] * (width - w + 1.0)), width - w)
        params: dict[str, torch.Tensor] = {
            "crop_box": torch.stack((top, left, h, w), dim=1),
            "flip": u[:, _U_FLIP] < self.flip_p,
        }
        sb, sc, ss, sh = self.jitter
        params["jitter"] = u[:, _U_JITTER] < (self.jitter_p if any(s > 0 for s in self.jitter) else 0.0)
        for key, col, s in (
            ("brightness", _U_BRIGHT, sb),
            ("contrast", _U_CONTRAST, sc),
            ("saturation", _U_SAT, ss),
        ):
            f_lo, f_hi = max(0.0, 1.0 - s), 1.0 + s
            params[key] = f_lo + (f_hi - f_lo) * u[:, col]
        params["hue"] = sh * (2.0 * u[:, _U_HUE] - 1.0)
        params["jitter_order"] = torch.argsort(u[:, _U_ORDER], dim=1)
        params["gray"] = u[:, _U_GRAY] < self.gray_p
        params["blur"] = u[:, _U_BLUR] < self.blur_p
        s_lo, s_hi = self.blur_sigma
        params["sigma"] = s_lo + (s_hi - s_lo) * u[:, _U_SIGMA]
        params["solarize"] = u[:, _U_SOLARIZE] < self.solarize_p
        return params

    def _crop_resize(self, x: torch.Tensor, n: int, box: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Crop + bilinear resize (+ flip) of all patches with one ``grid_sample``.

        Args:
            x: float (B, 3, H, W) in [0, 1].
            n: patches per image.
            box: (n*B, 4) crop boxes (top, left, height, width), patch-major.
            flip: bool (n*B,).

        Returns:
            New contiguous float (n*B, 3, S, S), S = out_size, values clamped to [0, 1].
        """
        bsz, _, height, width = x.shape
        s = self.out_size
        j = torch.arange(s, device=x.device, dtype=torch.float32) + 0.5  # output pixel centres

        def axis(start: torch.Tensor, size: torch.Tensor, full: int) -> torch.Tensor:
            # source pixel coordinate of each output pixel, clamped to the crop like crop-then-resize
            src = torch.addcmul((start - 0.5).unsqueeze(1), j.unsqueeze(0), (size / s).unsqueeze(1))  # (N, S)
            src = torch.minimum(torch.maximum(src, start.unsqueeze(1)), (start + size - 1.0).unsqueeze(1))
            return src.mul_(2.0 / full).add_(1.0 / full - 1.0)  # to grid_sample's [-1, 1], align_corners=False

        gy = axis(box[:, 0], box[:, 2], height)
        gx = axis(box[:, 1], box[:, 3], width)
        gx = torch.where(flip.unsqueeze(1), gx.flip(1), gx)
        # image b's grid holds its n patches stacked along the height: (B, n*S, S, 2)
        gx = gx.view(n, bsz, 1, s).transpose(0, 1).expand(bsz, n, s, s)
        gy = gy.view(n, bsz, s, 1).transpose(0, 1).expand(bsz, n, s, s)
        grid = torch.stack((gx, gy), dim=-1).view(bsz, n * s, s, 2)
        y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (B,3,n*S,S)
        # patch-major copy, fused with a clamp against bilinear rounding slightly above 1
        patch_major = y.view(bsz, 3, n, s, s).permute(2, 0, 1, 3, 4)
        if torch.compiler.is_compiling():  # the compiler fuses this itself (and cannot write into a view with out=)
            return patch_major.clamp(0.0, 1.0).reshape(n * bsz, 3, s, s)
        out = torch.empty(n * bsz, 3, s, s, device=x.device, dtype=torch.float32)
        torch.clamp(patch_major, 0.0, 1.0, out=out.view(n, bsz, 3, s, s))
        return out

    def _apply_photometric(self, out: torch.Tensor, params: dict[str, torch.Tensor]) -> None:
        """Colour jitter, grayscale, blur and solarize, IN PLACE on ``out`` (N, 3, S, S)."""
        sync_free = self.sync_free if self.sync_free is not None else (self.compiled or out.device.type != "cpu")
        if sync_free:
            self._apply_photometric_masked(out, params)
            return
        num = out.shape[0]
        jit_on = params["jitter"]
        order = params["jitter_order"]
        hue_on = self.jitter[_HUE] > 0 and self.jitter_p > 0
        # step (0..3) at which each patch applies hue; 4 = never
        hue_step = torch.full((num,), 4, device=out.device, dtype=torch.long)
        if hue_on:
            hue_step = torch.where(jit_on, (order == _HUE).to(torch.long).argmax(dim=1), hue_step)
        masks = [params["gray"], params["blur"], params["solarize"]]
        # one host sync for every count the masked ops need
        counts = torch.cat(
            (
                torch.bincount(hue_step, minlength=5)[:4],
                torch.stack([m.sum() for m in masks]),
                jit_on.any().view(1).long(),
            )
        ).tolist()
        hue_counts, mask_counts, any_jitter = counts[:4], counts[4:7], bool(counts[7])

        if any_jitter:
            hue_groups = torch.argsort(hue_step, stable=True).split(hue_counts + [num - sum(hue_counts)])
            for k in self._jitter_blends(out, params):
                if hue_counts[k]:
                    idx = hue_groups[k]
                    out.index_copy_(0, idx, adjust_hue_(out.index_select(0, idx), params["hue"].index_select(0, idx)))

        # indices of the selected patches, ascending (a stable sort puts the True entries first)
        gray_idx, blur_idx, sol_idx = (
            torch.argsort((~m).to(torch.uint8), stable=True)[:c] if c else None
            for m, c in zip(masks, mask_counts, strict=True)
        )
        if gray_idx is not None:
            gray = rgb_to_gray(out.index_select(0, gray_idx))
            out.index_copy_(0, gray_idx, gray.expand(-1, 3, -1, -1))
        if blur_idx is not None:
            blurred = gaussian_blur(
                out.index_select(0, blur_idx), params["sigma"].index_select(0, blur_idx), self.blur_kernel_size
            )
            out.index_copy_(0, blur_idx, blurred.clamp_(0.0, 1.0))
        if sol_idx is not None:
            sol = out.index_select(0, sol_idx)
            out.index_copy_(0, sol_idx, torch.minimum(sol, 1.0 - sol, out=sol))

    @staticmethod
    def _jitter_blends(out: torch.Tensor, params: dict[str, torch.Tensor]) -> Iterator[int]:
        """The colour jitter's 4 steps on ``out``, IN PLACE: at step k every jittered patch takes the brightness,
        contrast or saturation blend of its k-th op (hue and patches not jittered: identity); yields k after it,
        for the caller to apply the hue of the patches whose k-th op is hue."""
        jit_on, order = params["jitter"], params["jitter_order"]
        factors = torch.stack((params["brightness"], params["contrast"], params["saturation"]), dim=1)
        no_op = torch.full_like(order[:, 0], _HUE)
        workspace = out.new_empty(out.shape[0], 1, out.shape[-2], out.shape[-1])
        for k in range(4):
            op = torch.where(jit_on, order[:, k], no_op)  # patches not jittered: identity
            factor = factors.gather(1, op.clamp(max=_SATURATION).unsqueeze(1)).squeeze(1)
            blend_jitter(out, op, factor, workspace)
            yield k

    def _apply_photometric_masked(self, out: torch.Tensor, params: dict[str, torch.Tensor]) -> None:
        """:meth:`_apply_photometric` without a host synchronisation: every op on every patch, its result kept
        where the patch's mask selects it (the same values as the indexed path)."""
        jit_on, order = params["jitter"], params["jitter_order"]
        if any(s > 0 for s in self.jitter) and self.jitter_p > 0:
            for k in self._jitter_blends(out, params):
                if self.jitter[_HUE] > 0:
                    _where_(jit_on & (order[:, k] == _HUE), adjust_hue(out, params["hue"]), out)
        if self.gray_p > 0:
            _where_(params["gray"], rgb_to_gray(out).expand(-1, 3, -1, -1), out)
        if self.blur_p > 0:
            _where_(params["blur"], gaussian_blur(out, params["sigma"], self.blur_kernel_size).clamp_(0.0, 1.0), out)
        if self.solarize_p > 0:
            _where_(params["solarize"], solarize(out), out)


@functools.cache
def _compiled_patches(backend: str = "inductor") -> Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """MultiPatchAugment.patches_from_uniforms through torch.compile (one compiled function per backend for every
    instance; its guards tell instances, devices and shapes apart), made at the first use so that importing compiles
    nothing."""
    return torch.compile(_patches_from_uniforms, backend=backend)


def _patches_from_uniforms(aug: MultiPatchAugment, images: torch.Tensor, u: torch.Tensor, n: int):
    return aug.patches_from_uniforms(images, u, n)


def _where_(mask: torch.Tensor, new: torch.Tensor, out: torch.Tensor) -> None:
    """out[j] = new[j] where mask[j] (per patch), IN PLACE, without a host synchronisation."""
    torch.where(mask.view(-1, 1, 1, 1), new, out, out=out)
