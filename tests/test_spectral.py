
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pflresfim_jax import spectral

pytestmark = pytest.mark.reference
# Tolerances: a float32 FFT of an H x W image errs by about eps * log2(HW) of the
# spectrum's largest entry (the DC amplitude, HW * mean, ~50-180 here) and an inverse
# FFT by as much of the pixels (<= 1): so pixels are compared to 1e-5 (~80 eps, two FFTs
# of <= 357 points), amplitudes to 1e-3 absolute (~1e-5 of the DC bin).


def np_transfer(img, target_amp_window, L, lam, clip=True):
  """Reference: one image [H, W, C], written out plainly with numpy."""
  h, w, c = img.shape
  b = int(np.floor(min(h, w) * L))
  out = np.zeros_like(img, dtype=np.float64)
  for ch in range(c):
    f = np.fft.fftshift(np.fft.fft2(img[:, :, ch].astype(np.float64)))
    amp, pha = np.abs(f), np.angle(f)
    r0, c0 = h // 2, w // 2
    win = amp[r0 - b:r0 + b + 1, c0 - b:c0 + b + 1]
    amp[r0 - b:r0 + b + 1, c0 - b:c0 + b + 1] = (1 - lam) * win + lam * target_amp_window[:, :, ch]
    rec = np.fft.ifft2(np.fft.ifftshift(amp * np.exp(1j * pha)))
    out[:, :, ch] = rec.real
  return np.clip(out, 0, 1) if clip else out


def np_window(img, L):
  h, w, c = img.shape
  b = int(np.floor(min(h, w) * L))
  r0, c0 = h // 2, w // 2
  amps = [np.abs(np.fft.fftshift(np.fft.fft2(img[:, :, ch])))[r0 - b:r0 + b + 1, c0 - b:c0 + b + 1]
          for ch in range(c)]
  return np.stack(amps, -1)


SIZES = [(16, 16), (15, 21), (17, 12)]


@pytest.mark.parametrize('hw', SIZES)
@pytest.mark.parametrize('ratio', [0.0, 0.05, 0.1, 0.25])
def test_transfer_matches_numpy(hw, ratio):
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(3, *hw, 3)).astype(np.float32)
  y = rng.uniform(size=(3, *hw, 3)).astype(np.float32)
  lam = np.array([0.3, 0.7, 1.0], np.float32)
  bank = np.stack([np_window(im, ratio) for im in y])
  np.testing.assert_allclose(spectral.amplitude_bank(jnp.asarray(y), ratio), bank,
                             rtol=1e-4, atol=1e-3)   # amplitudes, see the top
  got = spectral.transfer(jnp.asarray(x), jnp.asarray(bank), ratio, jnp.asarray(lam))
  want = np.stack([np_transfer(x[i], bank[i], ratio, lam[i]) for i in range(3)])
  np.testing.assert_allclose(got, want, atol=2e-5)   # pixels after two FFTs, see the top


def test_window_size():
  assert spectral.low_freq_window((256, 256), 0.01) == 2
  assert spectral.low_freq_window((15, 21), 0.1) == 1
  assert spectral.low_freq_window((64, 64), 0.0) == 0
  with pytest.raises(ValueError, match='spectral.ratio'):
    spectral.low_freq_window((64, 64), 0.5)


def test_dc_only_is_channel_mean_shift():
  rng = np.random.default_rng(1)
  x = rng.uniform(0.2, 0.6, size=(2, 12, 13, 3)).astype(np.float32)
  y = rng.uniform(0.3, 0.5, size=(2, 12, 13, 3)).astype(np.float32)
  bank = spectral.amplitude_bank(jnp.asarray(y), 0.0)
  assert bank.shape == (2, 1, 1, 3)
  out = np.asarray(spectral.transfer(jnp.asarray(x), bank, 0.0, 1.0, value_range=None))
  shift = y.mean(axis=(1, 2), keepdims=True) - x.mean(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(out, x + shift, atol=1e-5)   # pixels, see the top


@pytest.mark.parametrize('hw', SIZES)
def test_identities(hw):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.uniform(size=(4, *hw, 3)).astype(np.float32))
  other = spectral.amplitude_bank(jnp.asarray(rng.uniform(size=(4, *hw, 3)), jnp.float32), 0.1)
  np.testing.assert_allclose(spectral.transfer(x, other, 0.1, 0.0), x, atol=1e-5)   # FFT round trip
  own = spectral.amplitude_bank(x, 0.1)
  np.testing.assert_allclose(spectral.transfer(x, own, 0.1, 1.0), x, atol=1e-5)


@pytest.mark.parametrize('hw', SIZES)
@pytest.mark.parametrize('ratio', [0.0, 0.1, 0.2])
def test_imaginary_residue_is_rounding(hw, ratio):
  """The blended window is Hermitian-symmetric, so the inverse FFT is real."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.uniform(size=(3, *hw, 3)), jnp.float32)
  target = spectral.amplitude_bank(jnp.asarray(rng.uniform(size=(3, *hw, 3)), jnp.float32), ratio)
  rec = spectral.transfer_complex(x, target, ratio, jnp.array([0.2, 0.5, 1.0]))
  assert float(jnp.abs(rec.imag).max()) < 1e-5   # rounding of the inverse FFT, see the top
  assert float(jnp.abs(rec.real).max()) > 0.5


def test_simulate_draws_only_other_clients():
  rng = np.random.default_rng(4)
  images = jnp.asarray(rng.uniform(size=(64, 8, 8, 1)).astype(np.float32))
  # Every window is the DC bin only (ratio 0); an 8x8 image of mean mu has DC amplitude
  # 64 * mu, so with lam = 1 the output's mean reveals the window's owner: client c's
  # windows give mean 0.25 * (c + 1); the padding entry (owner -1) would give 2.25.
  owner = jnp.array([0, 0, 1, 1, 2, -1])
  bank = (64 * 0.25 * jnp.array([1.0, 1, 2, 2, 3, 9]))[:, None, None, None]
  out = spectral.simulate(jax.random.PRNGKey(0), images, 1, bank, owner, 0.0, (1.0, 1.0),
                          value_range=None)
  means = np.round(np.asarray(out.mean(axis=(1, 2, 3))) / 0.25).astype(int)
  assert set(means.tolist()) == {1, 3}  # clients 0 and 2, never 1 or the padding


def test_simulate_single_client_is_identity():
  images = jnp.asarray(np.random.default_rng(5).uniform(size=(3, 8, 8, 3)), jnp.float32)
  bank = spectral.amplitude_bank(images, 0.1)
  out = spectral.simulate(jax.random.PRNGKey(0), images, 0, bank, jnp.zeros(3, int), 0.1)
  np.testing.assert_allclose(out, images, atol=1e-5)   # FFT round trip, see the top


def test_transfer_jits_and_vmaps():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.uniform(size=(2, 3, 16, 16, 3)).astype(np.float32))
  bank = jax.vmap(lambda im: spectral.amplitude_bank(im, 0.1))(x)[:, ::-1]
  f = jax.jit(jax.vmap(lambda im, w: spectral.transfer(im, w, 0.1, 0.5)))
  out = f(x, bank)
  for k in range(2):
    # Another program (vmapped, jitted) around the same FFTs: pixels to 1e-5, see the top.
    np.testing.assert_allclose(out[k], spectral.transfer(x[k], bank[k], 0.1, 0.5), atol=1e-5)


def test_client_mean_bank():
  bank = jnp.arange(5.0)[:, None, None, None] * jnp.ones((5, 3, 3, 2))
  owner = jnp.array([0, 1, 0, 1, -1])
  mean, mowner = spectral.client_mean_bank(bank, owner, 3)
  np.testing.assert_array_equal(mean[:, 0, 0, 0], [1.0, 2.0, 0.0])   # means of small integers: exact
  np.testing.assert_array_equal(mowner, [0, 1, -1])


@pytest.mark.parametrize('n', [0, 5, 7])
def test_amplitude_windows_in_blocks_match_numpy(n):
  # Host helper for building a bank: blocks of 3 (the last padded) through one program.
  rng = np.random.default_rng(n)
  images = rng.uniform(size=(n, 15, 21, 3)).astype(np.float32)
  got = spectral.amplitude_windows(images, 0.1, block=3)
  assert got.shape == (n, 3, 3, 3) and got.dtype == np.float32
  for img, win in zip(images, got):
    np.testing.assert_allclose(win, np_window(img.astype(np.float64), 0.1), atol=1e-3)
  np.testing.assert_allclose(got, spectral.amplitude_bank(jnp.asarray(images), 0.1), rtol=1e-6)
