"""Whisper's input features in numpy: 16 kHz audio -> log-mel spectrogram (100 frames per second).

The same computation as Whisper's own ``log_mel_spectrogram`` (periodic Hann window of 400 samples,
hop 160, centred frames with reflection padding, Slaney mel filters, log10 clamped to 8 below the peak,
then scaled), so the exported models see what they were trained on without torch at run time.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
CHUNK_SECONDS = 30
N_SAMPLES = SAMPLE_RATE * CHUNK_SECONDS
N_FRAMES = N_SAMPLES // HOP  # 3000 frames per 30 s window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    return np.where(freq >= min_log_hz, min_log_mel + np.log(np.maximum(freq, 1e-10) / min_log_hz) / logstep,
                    freq / f_sp)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels)


@lru_cache(maxsize=4)
def mel_filters(n_mels: int) -> np.ndarray:
    """Slaney-scale, Slaney-normalized triangular filters, shape (n_mels, N_FFT // 2 + 1)."""
    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    mel_points = _mel_to_hz(np.linspace(_hz_to_mel(np.array(0.0)), _hz_to_mel(np.array(SAMPLE_RATE / 2)), n_mels + 2))
    widths = np.diff(mel_points)
    ramps = mel_points[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_points[2:n_mels + 2] - mel_points[:n_mels]))[:, None]
    return weights.astype(np.float32)


@lru_cache(maxsize=1)
def _window() -> np.ndarray:
    n = np.arange(N_FFT)
    return (0.5 - 0.5 * np.cos(2 * np.pi * n / N_FFT)).astype(np.float32)  # periodic Hann


def log_mel(audio: np.ndarray, n_mels: int = 80) -> np.ndarray:
    """Log-mel features of float32 16 kHz mono ``audio``, shape (n_mels, len(audio) // HOP)."""
    audio = np.asarray(audio, dtype=np.float32)
    if len(audio) < N_FFT:
        audio = np.pad(audio, (0, N_FFT - len(audio)))
    padded = np.pad(audio, N_FFT // 2, mode="reflect")
    count = 1 + (len(padded) - N_FFT) // HOP
    frames = np.lib.stride_tricks.as_strided(padded, shape=(count, N_FFT),
                                             strides=(padded.strides[0] * HOP, padded.strides[0]))
    power = np.abs(np.fft.rfft(frames * _window(), axis=-1)) ** 2
    mel = mel_filters(n_mels) @ power[:-1].T.astype(np.float32)
    spec = np.log10(np.maximum(mel, 1e-10))
    spec = np.maximum(spec, spec.max() - 8.0)
    return ((spec + 4.0) / 4.0).astype(np.float32)


def window_features(samples: np.ndarray, n_mels: int = 80) -> np.ndarray:
    """Log-mel of one 30 s window, shape (n_mels, N_FRAMES), so only a window of the clip needs to be in
    memory. A window that runs past the clip's end is padded with silence, as Whisper pads the clip; the
    clamp to 8 below the peak is then per window, as in Hugging Face's feature extractor."""
    samples = np.asarray(samples, np.float32)[:N_SAMPLES]
    return log_mel(np.pad(samples, (0, N_SAMPLES - len(samples))), n_mels)
