"""Spectral style transfer: low-frequency Fourier amplitude windows (METHOD.md 2).

Conventions (those of FDA / FedDG-ELCFS):

* 2-D FFT over (H, W), per image and channel; amplitude ``A = |F|``, phase
  ``P = angle(F)``.
* After ``fftshift`` the zero frequency sits at ``(H // 2, W // 2)``. With
  ``b = floor(min(H, W) * ratio)`` the low-frequency window is the
  ``(2b+1) x (2b+1)`` square of integer frequencies ``-b..b`` on both axes, centred
  there. It is Hermitian-symmetric, so the inverse FFT of a blended spectrum is real
  up to rounding. ``ratio = 0`` keeps the DC bin only.
* A client shares only windows ``[N, 2b+1, 2b+1, C]``: never full spectra or pixels.

Every function here is pure, jit- and vmap-friendly; ``ratio`` must be a Python
float (it fixes array shapes).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def low_freq_window(shape_hw: Sequence[int], ratio: float) -> int:
  """Half-width ``b`` of the centred low-frequency window for images of ``shape_hw``.

  Args:
    shape_hw: ``(H, W)``.
    ratio: ``L`` in METHOD.md 2, ``0 <= L < 0.5``.

  Returns:
    ``b = floor(min(H, W) * ratio)``, so the window is ``(2b+1) x (2b+1)``.
  """
  h, w = int(shape_hw[0]), int(shape_hw[1])
  if not 0.0 <= ratio < 0.5:
    raise ValueError(f'spectral.ratio must be in [0, 0.5), got {ratio!r}')
  b = int(math.floor(min(h, w) * ratio))
  if 2 * b + 1 > min(h, w):
    raise ValueError(
        f'spectral.ratio={ratio} gives a {2 * b + 1}-wide window, larger than '
        f'the {h}x{w} images')
  return b


def _window_slices(h: int, w: int, b: int) -> Tuple[slice, slice]:
  ch, cw = h // 2, w // 2
  return slice(ch - b, ch + b + 1), slice(cw - b, cw + b + 1)


def _spectrum(images: Array) -> Array:
  """[N, H, W, C] real -> centred (fftshifted) complex spectrum [N, H, W, C]."""
  f = jnp.fft.fft2(images.astype(jnp.float32), axes=(1, 2))
  return jnp.fft.fftshift(f, axes=(1, 2))


def amplitude_bank(images: Array, ratio: float) -> Array:
  """The low-frequency amplitude windows a client shares.

  Args:
    images: float ``[N, H, W, C]``.
    ratio: window ratio ``L``.

  Returns:
    float32 ``[N, 2b+1, 2b+1, C]``, the centred amplitude window of every image.
  """
  _, h, w, _ = images.shape
  b = low_freq_window((h, w), ratio)
  rows, cols = _window_slices(h, w, b)
  return jnp.abs(_spectrum(images))[:, rows, cols, :]


_amplitude_bank_jit = jax.jit(amplitude_bank, static_argnums=1)


def amplitude_windows(images, ratio: float, block: int = 32) -> np.ndarray:
  """:func:`amplitude_bank` of host images ``[N, H, W, C]``, as a host array.

  For building a bank outside a jitted program: blocks of ``block`` images (the last
  padded) through one compiled program, so clients with different image counts share
  it and memory stays bounded; the same values as calling :func:`amplitude_bank`.
  """
  images = np.asarray(images, np.float32)
  n = len(images)
  padded = np.pad(images, ((0, -n % block),) + ((0, 0),) * (images.ndim - 1))
  out = [np.asarray(_amplitude_bank_jit(jnp.asarray(padded[i:i + block]), ratio))
         for i in range(0, len(padded), block)]
  return np.concatenate(out)[:n] if out else np.asarray(amplitude_bank(jnp.asarray(images), ratio))


def transfer_complex(images: Array, target_windows: Array, ratio: float, lam) -> Array:
  """Inverse FFT of the blended spectrum, before taking the real part.

  Its imaginary part is rounding noise (the window is Hermitian-symmetric); exposed
  so that tests can check exactly that. Arguments as in :func:`transfer`.

  Returns:
    complex64 ``[N, H, W, C]``.
  """
  n, h, w, c = images.shape
  b = low_freq_window((h, w), ratio)
  if target_windows.shape != (n, 2 * b + 1, 2 * b + 1, c):
    raise ValueError(
        f'target_windows has shape {target_windows.shape}, expected '
        f'{(n, 2 * b + 1, 2 * b + 1, c)} for images {images.shape} and ratio {ratio}')
  rows, cols = _window_slices(h, w, b)
  f = _spectrum(images)
  amp, phase = jnp.abs(f), jnp.angle(f)
  lam = jnp.broadcast_to(jnp.asarray(lam, jnp.float32).reshape(-1), (n,))
  lam = lam[:, None, None, None]
  blended = (1.0 - lam) * amp[:, rows, cols, :] + lam * target_windows
  amp = amp.at[:, rows, cols, :].set(blended.astype(amp.dtype))
  f = jnp.fft.ifftshift(amp * jnp.exp(1j * phase), axes=(1, 2))
  return jnp.fft.ifft2(f, axes=(1, 2))


def transfer(images: Array, target_windows: Array, ratio: float, lam,
             value_range: Optional[Tuple[float, float]] = (0.0, 1.0)) -> Array:
  """Render ``images`` in the style given by ``target_windows``.

  Inside the window the amplitude becomes ``(1 - lam) * A_x + lam * A_t``; outside
  it stays ``A_x``; the phase is always the image's own.

  Args:
    images: float ``[N, H, W, C]``.
    target_windows: ``[N, 2b+1, 2b+1, C]`` amplitude windows (from
      :func:`amplitude_bank`), one per image.
    ratio: window ratio ``L`` (must be the one the windows were made with).
    lam: blend strength in ``[0, 1]``, a scalar or ``[N]``.
    value_range: ``(lo, hi)`` to clip the result to (the input's valid range), or
      ``None`` to skip clipping.

  Returns:
    float32 ``[N, H, W, C]``.
  """
  out = jnp.real(transfer_complex(images, target_windows, ratio, lam)).astype(jnp.float32)
  if value_range is not None:
    out = jnp.clip(out, value_range[0], value_range[1])
  return out


def simulate(key: Array, images: Array, client_id, bank: Array, bank_owner: Array,
             ratio: float, lam_range: Tuple[float, float] = (0.0, 1.0),
             value_range: Optional[Tuple[float, float]] = (0.0, 1.0)) -> Array:
  """Client ``client_id``'s images rendered in other clients' styles.

  For every image, one window of the bank owned by another client is drawn
  uniformly, and ``lam ~ U(lam_range)``. Bank entries with a negative owner are
  padding and never drawn. When no other client has a window, the images are
  returned unchanged (lam = 0).

  Args:
    key: PRNG key.
    images: float ``[N, H, W, C]``.
    client_id: int (may be traced) id of the client that owns ``images``.
    bank: ``[M, 2b+1, 2b+1, C]`` amplitude windows of all clients.
    bank_owner: int ``[M]``, the client id of every bank entry (-1 = padding).
    ratio: window ratio the bank was built with.
    lam_range: ``(lam_min, lam_max)``.
    value_range: see :func:`transfer`.

  Returns:
    float32 ``[N, H, W, C]``.
  """
  n = images.shape[0]
  k_idx, k_lam = jax.random.split(key)
  eligible = (bank_owner >= 0) & (bank_owner != client_id)
  logits = jnp.where(eligible, 0.0, -jnp.inf)
  has_other = jnp.any(eligible)
  idx = jax.random.categorical(k_idx, jnp.where(has_other, logits, 0.0), shape=(n,))
  lam = jax.random.uniform(k_lam, (n,), minval=lam_range[0], maxval=lam_range[1])
  lam = jnp.where(has_other, lam, 0.0)
  return transfer(images, bank[idx], ratio, lam, value_range)


def client_mean_bank(bank: Array, bank_owner: Array, num_clients: int) -> Tuple[Array, Array]:
  """Collapse a per-image bank into one averaged window per client ('client_mean').

  Args:
    bank: ``[M, 2b+1, 2b+1, C]``.
    bank_owner: int ``[M]`` (-1 = padding).
    num_clients: ``K``.

  Returns:
    ``([K, 2b+1, 2b+1, C], owner [K])``; a client without entries gets owner -1.
  """
  onehot = (bank_owner[:, None] == jnp.arange(num_clients)[None, :]).astype(bank.dtype)
  counts = onehot.sum(0)
  mean = jnp.einsum('mk,m...->k...', onehot, bank) / jnp.maximum(counts, 1.0)[
      (...,) + (None,) * (bank.ndim - 1)]
  owner = jnp.where(counts > 0, jnp.arange(num_clients), -1)
  return mean, owner
