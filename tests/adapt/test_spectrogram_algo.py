"""vitkit/adapt/spectrogram_algo.py beyond test_inputs.py's oracle: the cases mutation testing found untested
(benchmarks/RESULTS.md, "Mutation testing, stop 25") -- a band-limited filterbank (`f_min`, `f_max`), the float64
precision of the filter edges at AST's 128 mels, `log_mel`'s defaults, float64 waveforms, silence (the `eps`),
and the refusal. Expected values come from python floats and numpy; nothing from vitkit computes them."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vitkit.adapt.spectrogram_algo import log_mel, mel_filterbank


def filters(n_freqs: int, n_mels: int, sr: int, f_min: float = 0.0, f_max: float | None = None) -> torch.Tensor:
    """Triangular HTK-mel filters between f_min and f_max, one bin at a time in python floats (float64)."""
    mel = lambda f: 2595 * math.log10(1 + f / 700)  # noqa: E731
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    lo_mel, hi_mel = mel(f_min), mel(sr / 2 if f_max is None else f_max)
    edges = [hz(lo_mel + (hi_mel - lo_mel) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    fb = torch.zeros(n_freqs, n_mels, dtype=torch.float64)
    for j in range(n_freqs):
        f = j * (sr / 2) / (n_freqs - 1)
        for m in range(n_mels):
            lo, mid, hi = edges[m:m + 3]
            fb[j, m] = max(0.0, min((f - lo) / (mid - lo), (hi - f) / (hi - mid)))
    return fb


def log_mel_oracle(wave: np.ndarray, sr: int, n_fft: int, hop: int, n_mels: int) -> np.ndarray:
    """(n_mels, frames): centred STFT (reflect padding, periodic Hann), power, mel filters, log(· + 1e-6)."""
    padded = np.pad(wave, n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = np.stack([padded[i * hop:i * hop + n_fft] * window for i in range(1 + len(wave) // hop)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    return np.log(power @ filters(n_fft // 2 + 1, n_mels, sr).numpy() + 1e-6).T


def test_mel_filterbank_band_limits_and_float64_edges():
    torch.testing.assert_close(mel_filterbank(201, 128, 16000), filters(201, 128, 16000).float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(mel_filterbank(257, 64, 22050, f_min=125.0, f_max=7600.0),
                               filters(257, 64, 22050, 125.0, 7600.0).float(), atol=1e-6, rtol=0)


def test_log_mel_defaults_float64_and_silence():
    """Defaults: 16 kHz, n_fft 400 (25 ms), hop 160 (10 ms), 128 mels; a float64 waveform stays float64; silence
    gives log(eps), not NaN."""
    rng = np.random.default_rng(0)
    wave = np.sin(2 * np.pi * 1000 * np.arange(3200) / 16000) + 0.1 * rng.standard_normal(3200)
    got = log_mel(torch.from_numpy(wave)[None].expand(2, -1))  # (B, T) float64
    assert got.shape == (2, 1, 128, 21) and got.dtype == torch.float64
    expected = torch.from_numpy(log_mel_oracle(wave, 16000, 400, 160, 128))
    torch.testing.assert_close(got[1, 0], expected, atol=1e-4, rtol=1e-5)
    silent = log_mel(torch.zeros(800), n_mels=16)
    torch.testing.assert_close(silent, torch.full((1, 1, 16, 6), math.log(1e-6)))
    with pytest.raises(ValueError, match="log_mel: expected waveforms \\(B, T\\) or \\(T,\\), got shape \\(1, 2, 3\\)"):
        log_mel(torch.zeros(1, 2, 3))
