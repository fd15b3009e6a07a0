"""AV-Digits: paired (handwritten image, spoken word) samples of the digits 0-9.

Images are the 1,797 real handwritten UCI digits that scikit-learn ships (8x8), upscaled to 28x28 and degraded
(blur, noise, an occluding block, a shift). Audio is each digit spoken by Debian's ``espeak-ng`` across accents,
voice variants, speeds and pitches, shifted in time and buried in coloured noise and a faint distractor word,
stored as a 40x48 log-mel spectrogram. Both are degraded so that each modality alone is unreliable and the two
together are clearly better: the setting where fusion and missing-modality robustness matter.

Regenerate (needs ``apt-get install espeak-ng`` and ``pip install 'ume-edge[data]'``)::

    python -m ume_edge.data.avdigits --generate                                   # writes ./avdigits.npz
    python -m ume_edge.data.avdigits --generate --out ume_edge/data/avdigits.npz  # replaces the shipped file

The output is reproducible from ``--seed`` and is committed as ``ume_edge/data/avdigits.npz``. Every file is written
to a temporary name beside ``--out`` and renamed into place, so an interrupted run leaves ``--out`` as it was.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ume_edge.atomic import write_atomically
from ume_edge.cli_common import DefaultsFormatter

DATA_FILE = Path(__file__).with_name("avdigits.npz")
CLASS_NAMES = [str(d) for d in range(10)]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPLITS = ("train", "val", "test", "calib")

# How many source images each split owns, and how many (image, audio) pairs each image makes.
IMAGE_COUNTS = {"val": 300, "test": 400, "calib": 200}  # train takes the rest (897)
PAIRS_PER_IMAGE = {"train": 3, "val": 2, "test": 2, "calib": 1}

SAMPLE_RATE = 22050
CLIP_SECONDS = 1.0
N_FFT = 1024
N_MELS = 40
N_FRAMES = 48
AUDIO_SHAPE = (1, N_MELS, N_FRAMES)
IMAGE_SHAPE = (1, 28, 28)
# Log-mel values are stored as uint8 over this dB range, then mapped back to float32 on load.
DB_FLOOR, DB_CEIL = -80.0, 0.0

ACCENTS = ["en", "en-gb", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029"]
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "croak", "klatt", "klatt2",
            "klatt3", "whisper", "Andy", "Annie", "boris", "david", "ed", "grandma", "grandpa", "john", "linda",
            "max", "michel", "norbert", "paul", "steph", "travis", "victor", "zac", "aunty", "belinda"]


@dataclass(frozen=True)
class Degradation:
    """How hard each modality is made. Tuned so each alone reaches 60-90% and together >= 5 points more."""

    image_noise: float = 0.34
    image_occlusion: int = 12
    audio_snr_db: tuple[float, float] = (-9.0, -2.0)
    audio_distractor_gain: float = 0.5


# ---------------------------------------------------------------- images

def _load_uci_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def _upscale(images8: np.ndarray) -> np.ndarray:
    from scipy.ndimage import zoom

    return np.clip(zoom(images8, (1, 3.5, 3.5), order=1), 0.0, 1.0)


def _degrade_image(image: np.ndarray, rng: np.random.Generator, deg: Degradation) -> np.ndarray:
    from scipy.ndimage import gaussian_filter, shift

    out = gaussian_filter(image, sigma=rng.uniform(0.5, 1.5))
    out = shift(out, rng.integers(-3, 4, size=2), order=0, mode="constant")
    size = deg.image_occlusion
    top, left = rng.integers(0, 28 - size, size=2)
    out[top:top + size, left:left + size] = rng.uniform(0.0, 1.0)
    out = out + rng.normal(0.0, deg.image_noise, out.shape)
    return np.clip(out, 0.0, 1.0)


# ---------------------------------------------------------------- audio

def _speak(word: str, accent: str, variant: str, speed: int, pitch: int) -> np.ndarray:
    wav = subprocess.run(
        ["espeak-ng", "-v", f"{accent}+{variant}", "-s", str(speed), "-p", str(pitch), "--stdout", word],
        check=True, capture_output=True).stdout
    return np.frombuffer(wav[44:], dtype=np.int16).astype(np.float32) / 32768.0


def _mel_filterbank() -> np.ndarray:
    def hz_to_mel(hz):
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    mel_points = np.linspace(hz_to_mel(60.0), hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2)
    hz_points = 700.0 * (10 ** (mel_points / 2595.0) - 1.0)
    bins = np.floor((N_FFT + 1) * hz_points / SAMPLE_RATE).astype(int)
    bank = np.zeros((N_MELS, N_FFT // 2 + 1), dtype=np.float32)
    for m in range(1, N_MELS + 1):
        left, centre, right = bins[m - 1], bins[m], bins[m + 1]
        bank[m - 1, left:centre] = (np.arange(left, centre) - left) / max(1, centre - left)
        bank[m - 1, centre:right] = (right - np.arange(centre, right)) / max(1, right - centre)
    return bank


_MEL_BANK = None


def log_mel(signal: np.ndarray) -> np.ndarray:
    """A ``[N_MELS, N_FRAMES]`` log-mel spectrogram in dB (relative to full scale) of a 1-second clip."""
    global _MEL_BANK
    if _MEL_BANK is None:
        _MEL_BANK = _mel_filterbank()
    hop = (len(signal) - N_FFT) // (N_FRAMES - 1)
    frames = np.stack([signal[i * hop:i * hop + N_FFT] for i in range(N_FRAMES)])
    power = np.abs(np.fft.rfft(frames * np.hanning(N_FFT), axis=1)) ** 2
    mel = _MEL_BANK @ power.T
    return np.clip(10.0 * np.log10(mel / N_FFT + 1e-10), DB_FLOOR, DB_CEIL)


def _coloured_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.normal(size=n))
    exponent = rng.uniform(0.0, 1.0)  # 0 white ... 1 pink
    spectrum /= np.maximum(np.arange(len(spectrum)), 1) ** (exponent / 2)
    noise = np.fft.irfft(spectrum, n)
    return noise / (np.std(noise) + 1e-8)


def _place(clip: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    clip = clip[:n]
    out = np.zeros(n, dtype=np.float32)
    start = rng.integers(0, n - len(clip) + 1)
    out[start:start + len(clip)] = clip
    return out


def _degrade_audio(clip: np.ndarray, distractor: np.ndarray, rng: np.random.Generator,
                   deg: Degradation) -> np.ndarray:
    n = int(SAMPLE_RATE * CLIP_SECONDS)
    speech = _place(clip, n, rng)
    speech_rms = np.sqrt(np.mean(speech ** 2)) + 1e-8
    snr_db = rng.uniform(*deg.audio_snr_db)
    noise = _coloured_noise(n, rng) * speech_rms / 10 ** (snr_db / 20)
    mixture = speech + noise + deg.audio_distractor_gain * _place(distractor, n, rng)
    return (mixture / (np.max(np.abs(mixture)) + 1e-8) * 0.5).astype(np.float32)


@dataclass(frozen=True)
class Voice:
    accent: str
    variant: str
    speed: int
    pitch: int


def _random_voices(count: int, rng: np.random.Generator) -> list[Voice]:
    return [Voice(str(rng.choice(ACCENTS)), str(rng.choice(VARIANTS)), int(rng.integers(110, 260)),
                  int(rng.integers(15, 90))) for _ in range(count)]


# ---------------------------------------------------------------- assembly

def _split_images(labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    order = rng.permutation(len(labels))
    splits, start = {}, 0
    for split in ("val", "test", "calib"):
        splits[split] = order[start:start + IMAGE_COUNTS[split]]
        start += IMAGE_COUNTS[split]
    splits["train"] = order[start:]
    return splits


def _render_clips(labels: np.ndarray, rng: np.random.Generator, deg: Degradation, workers: int) -> np.ndarray:
    """One fresh audio clip per pair: a unique voice speaking the label, degraded, as uint8 log-mel."""
    voices = _random_voices(len(labels), rng)
    distractor_words = rng.integers(0, 10, size=len(labels))
    distractor_voices = _random_voices(len(labels), rng)
    seeds = rng.integers(0, 2**31, size=len(labels))

    def render(i: int) -> np.ndarray:
        v, dv = voices[i], distractor_voices[i]
        clip = _speak(WORDS[labels[i]], v.accent, v.variant, v.speed, v.pitch)
        distractor = _speak(WORDS[distractor_words[i]], dv.accent, dv.variant, dv.speed, dv.pitch)
        mixture = _degrade_audio(clip, distractor, np.random.default_rng(seeds[i]), deg)
        return _to_uint8(log_mel(mixture))

    with ThreadPoolExecutor(workers) as pool:
        clips = []
        for done, clip in enumerate(pool.map(render, range(len(labels))), 1):
            clips.append(clip)
            if done % 500 == 0 or done == len(labels):
                print(f"\r  audio clips {done}/{len(labels)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return np.stack(clips)[:, None]


def _to_uint8(db: np.ndarray) -> np.ndarray:
    return np.round((db - DB_FLOOR) / (DB_CEIL - DB_FLOOR) * 255).astype(np.uint8)


def generate(seed: int = 0, deg: Degradation = Degradation(), workers: int = 4) -> dict[str, np.ndarray]:
    """Generate every split. Returns the arrays that go into ``avdigits.npz``."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed: run `apt-get install espeak-ng` (Debian/Ubuntu) and retry")
    rng = np.random.default_rng(seed)
    images8, labels = _load_uci_digits()
    images28 = _upscale(images8)
    arrays = {}
    for split, image_ids in _split_images(labels, rng).items():
        pair_ids = np.repeat(image_ids, PAIRS_PER_IMAGE[split])
        pair_labels = labels[pair_ids]
        print(f"{split}: {len(image_ids)} images -> {len(pair_ids)} pairs", file=sys.stderr)
        images = np.stack([_degrade_image(images28[i], rng, deg) for i in pair_ids])[:, None]
        arrays[f"{split}_image"] = np.round(images * 255).astype(np.uint8)
        arrays[f"{split}_audio"] = _render_clips(pair_labels, rng, deg, workers)
        arrays[f"{split}_labels"] = pair_labels
        arrays[f"{split}_image_source"] = pair_ids
    return arrays


def decode(arrays: dict[str, np.ndarray], split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Stored uint8 arrays of one split -> float32 model inputs and int64 labels."""
    image = arrays[f"{split}_image"].astype(np.float32) / 255.0
    audio = arrays[f"{split}_audio"].astype(np.float32) / 255.0 * 2.0 - 1.0
    return {"audio": audio, "image": image}, arrays[f"{split}_labels"].astype(np.int64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ume_edge.data.avdigits", formatter_class=DefaultsFormatter,
        description="Generate the AV-Digits data set (needs espeak-ng and scikit-learn).")
    parser.add_argument("--generate", action="store_true", help="generate the data set and write it")
    parser.add_argument("--export-split", choices=SPLITS,
                        help="write one split as an NPZ of float32 model inputs and labels (the build's data format; "
                             "default: none)")
    parser.add_argument("--export-recording", type=Path, metavar="PATH",
                        help="write a split as a robot's recording (ROS 2 topics /image, /audio, /label; see "
                             "ume_edge.recording.export) to replay with python -m ume_edge.client --recording PATH "
                             "(default: none)")
    parser.add_argument("--format", default="mcap", help="--export-recording's format: mcap, rosbag2-mcap or "
                        "rosbag2-sqlite3")
    parser.add_argument("--split", choices=SPLITS, default="test", help="--export-recording's split")
    parser.add_argument("--samples", type=int, default=None, help="--export-recording's first N samples "
                        "(default: all)")
    parser.add_argument("--drop", action="append", default=[], metavar="MODALITY=P",
                        help="--export-recording leaves out each reading of MODALITY with probability P (default: "
                             "none)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same file")
    parser.add_argument("--out", type=Path, default=None,
                        help="output .npz (default: ./avdigits.npz for --generate, ./avdigits-SPLIT.npz for "
                             "--export-split; never the installed package unless named here)")
    parser.add_argument("--workers", type=int, default=4, help="parallel espeak-ng processes")
    args = parser.parse_args(argv)
    if args.export_split:
        out = args.out or Path(f"avdigits-{args.export_split}.npz")
        with np.load(DATA_FILE) as arrays:
            inputs, labels = decode(arrays, args.export_split)
        _write_npz(out, {**inputs, "labels": labels})
        print(f"wrote {out}: {', '.join(f'{k} {list(v.shape)}' for k, v in inputs.items())}, labels")
        return
    if args.export_recording:
        _export_recording(parser, args)
        return
    if not args.generate:
        parser.error("nothing to do: pass --generate, --export-split SPLIT or --export-recording PATH")
    out = args.out or Path("avdigits.npz")
    _write_npz(out, generate(args.seed, workers=args.workers))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


def _write_npz(out: Path, arrays: dict[str, np.ndarray]) -> None:
    """``arrays`` as a compressed ``.npz`` at ``out``, written beside it under a temporary name and then renamed."""
    write_atomically(out, lambda file: np.savez_compressed(file, **arrays))


def _export_recording(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from ume_edge.recording.export import export_recording
    from ume_edge.recording.reader import RecordingError

    with np.load(DATA_FILE) as arrays:
        inputs, labels = decode(arrays, args.split)
    count = len(labels) if args.samples is None else args.samples
    try:
        drop = {name: float(p) for name, _, p in (item.partition("=") for item in args.drop)}
        kept = export_recording(args.export_recording, {name: array[:count] for name, array in inputs.items()},
                                labels[:count], args.format, drop, args.seed)
    except (ValueError, RecordingError) as error:
        parser.exit(2, f"error: {error}\n")
    readings = ", ".join(f"{name} {int(present.sum())}/{count}" for name, present in kept.items())
    print(f"wrote {args.export_recording} ({args.format}): readings {readings}, labels {count}")


if __name__ == "__main__":
    main()
