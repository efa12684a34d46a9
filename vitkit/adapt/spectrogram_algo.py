"""Log-mel spectrograms in plain torch: `torch.stft` and a hand-written triangular mel filterbank.

torchaudio is not a dependency and librosa's example clips download on first use, so the transform an audio
ViT (AST, ASiT) feeds on is written here: power spectrum `|STFT(x)|²` (Hann window), projected on `n_mels`
triangular filters equally spaced on the HTK mel scale `mel(f) = 2595 log10(1 + f / 700)`, then `log(· + eps)`.
"""
from __future__ import annotations


import torch


def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """Triangular filters `(n_freqs, n_mels)`: filter m rises from mel point m to m+1 and falls to m+2 (no
    area normalisation), over the `n_freqs` STFT bins `0 .. sample_rate / 2`."""
    f_max = sample_rate / 2 if f_max is None else f_max
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(hz_to_mel(torch.tensor(f_min, dtype=torch.float64)).item(),
                                     hz_to_mel(torch.tensor(f_max, dtype=torch.float64)).item(), n_mels + 2,
                                     dtype=torch.float64))
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]  # (n_mels,)
    rise = (freqs[:, None] - lo) / (mid - lo)
    fall = (hi - freqs[:, None]) / (hi - mid)
    return torch.clamp(torch.minimum(rise, fall), min=0.0).float()


def log_mel(wave: torch.Tensor, sample_rate: int = 16000, n_fft: int = 400, hop: int = 160, n_mels: int = 128,
            eps: float = 1e-6) -> torch.Tensor:
    """Log-mel spectrogram of waveforms `(B, T)` (or `(T,)`) -> `(B, 1, n_mels, frames)`, frames =
    1 + T // hop (centred STFT, reflect padding)."""
    if wave.ndim == 1:
        wave = wave[None]
    if wave.ndim != 2:
        raise ValueError(f"log_mel: expected waveforms (B, T) or (T,), got shape {tuple(wave.shape)}")
    window = torch.hann_window(n_fft, device=wave.device, dtype=wave.dtype)
    spec = torch.stft(wave, n_fft, hop_length=hop, window=window, center=True, return_complex=True)
    power = spec.abs() ** 2  # (B, n_fft // 2 + 1, frames)
    fb = mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate).to(wave.device, power.dtype)
    mel = torch.einsum("bft,fm->bmt", power, fb)
    return torch.log(mel + eps)[:, None]
