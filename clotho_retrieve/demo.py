"""Synthetic demo dataset in Clotho v2.1's on-disk layout (pure NumPy, deterministic, seconds to make).

Each clip is a background texture (rain, wind, running water, traffic rumble, a quiet room) with one or
two foreground sound events out of ten kinds, each with its own acoustic signature (a bell's inharmonic
partials, a siren's slow pitch sweep, a dog's short harmonic barks, ...). Two events are either in
sequence ("a bell rings, then a dog barks") or simultaneous ("... while ..."). Five captions per clip
name the events, their order and the background with varied wording, and no two clips of a split share
one description, so retrieving the right clip needs both what is heard and in which order.

Layout written (as Clotho v2.1 unpacks)::

    OUT/development/*.wav  OUT/validation/*.wav  OUT/evaluation/*.wav   (44.1 kHz, mono, 16-bit PCM)
    OUT/clotho_captions_{split}.csv   file_name,caption_1,...,caption_5
    OUT/demo_config.json              the DemoConfig that produced it
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from clotho_retrieve.datasets.clotho import SPLITS, captions_name
from clotho_retrieve.utils import ClothoRetrieveError, atomic_path, atomic_write_text, err_console

SR = 44100


@dataclass
class DemoConfig:
    n_development: int = 250
    n_validation: int = 50
    n_evaluation: int = 100
    duration: float = 5.0  # mean clip length in seconds; each clip is drawn within +-20 % of it
    seed: int = 0

    def sizes(self) -> dict[str, int]:
        return {"development": self.n_development, "validation": self.n_validation,
                "evaluation": self.n_evaluation}


# ----------------------------------------------------------------------------------------------
# Signal helpers
# ----------------------------------------------------------------------------------------------
def _t(n: int) -> np.ndarray:
    return np.arange(n) / SR


def _shaped_noise(rng: np.random.Generator, n: int, lo: float, hi: float, tilt: float = 0.0) -> np.ndarray:
    """White noise band-passed to [lo, hi] Hz in the frequency domain, with a spectral tilt (dB/octave)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    gain = ((f >= lo) & (f <= hi)).astype(float)
    if tilt:
        gain *= (np.maximum(f, 1.0) / 1000.0) ** (tilt / 6.02)
    x = np.fft.irfft(spec * gain, n)
    return x / (np.std(x) + 1e-9)


def _env(n: int, attack: float = 0.01, release: float = 0.05) -> np.ndarray:
    """Linear fade in and out, so events never click."""
    e = np.ones(n)
    a, r = min(n // 2, int(attack * SR)), min(n // 2, int(release * SR))
    if a:
        e[:a] = np.linspace(0, 1, a)
    if r:
        e[-r:] = np.linspace(1, 0, r)
    return e


def _place(out: np.ndarray, x: np.ndarray, start: int) -> None:
    end = min(len(out), start + len(x))
    out[start:end] += x[: end - start]


def _strikes(rng, n, period, jitter, make) -> np.ndarray:
    """Repeat a short sound `make(rng)` every `period` seconds (+- jitter) over n samples."""
    out = np.zeros(n)
    pos = int(rng.uniform(0, 0.1) * SR)
    while pos < n:
        _place(out, make(rng), pos)
        pos += int(period * rng.uniform(1 - jitter, 1 + jitter) * SR)
    return out


# ----------------------------------------------------------------------------------------------
# Ten foreground events, each `fn(rng, n_samples) -> waveform` with a distinct signature
# ----------------------------------------------------------------------------------------------
def _bell(rng, n):
    f0, t = rng.uniform(500, 900), _t(int(1.2 * SR))
    partials = [(1.0, 1.0), (2.76, 0.6), (5.40, 0.4), (8.93, 0.25)]  # inharmonic bell modes
    strike = sum(a * np.sin(2 * np.pi * f0 * r * t) * np.exp(-t * (2 + 2 * r)) for r, a in partials)
    return _strikes(rng, n, period=rng.uniform(0.7, 1.1), jitter=0.05, make=lambda rng: strike)


def _bark(rng, n):
    def bark(rng):
        t = _t(int(rng.uniform(0.12, 0.2) * SR))
        f = rng.uniform(350, 550) * (1 - 0.3 * t / t[-1])  # falling pitch
        phase = 2 * np.pi * np.cumsum(f) / SR
        saw = sum(np.sin(k * phase) / k for k in range(1, 12))
        noise = 0.3 * rng.standard_normal(len(t)) * np.exp(-t * 20)  # breathy onset
        return saw * np.abs(np.sin(np.pi * t / t[-1])) ** 0.5 + noise

    return _strikes(rng, n, period=rng.uniform(0.35, 0.6), jitter=0.25, make=bark)


def _siren(rng, n):
    t = _t(n)
    rate = rng.uniform(0.4, 0.8)  # slow wail: up and down about every 1.5 s
    f = 950 + 400 * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(f) / SR
    return (np.sin(phase) + 0.3 * np.sin(2 * phase)) * _env(n, 0.1, 0.1)


def _birds(rng, n):
    def chirp(rng):
        t = _t(int(rng.uniform(0.05, 0.1) * SR))
        f = np.linspace(rng.uniform(2500, 3500), rng.uniform(4500, 6000), len(t))
        return np.sin(2 * np.pi * np.cumsum(f) / SR) * np.hanning(len(t))

    return _strikes(rng, n, period=rng.uniform(0.12, 0.25), jitter=0.6, make=chirp)


def _knock(rng, n):
    def knock(rng):
        t = _t(int(0.08 * SR))
        thud = np.sin(2 * np.pi * rng.uniform(120, 180) * t) * np.exp(-t * 60)
        click = rng.standard_normal(len(t)) * np.exp(-t * 400)
        return thud + 0.5 * click

    def triple(rng):  # knock-knock-knock
        out = np.zeros(int(0.8 * SR))
        for k in range(3):
            _place(out, knock(rng), int(k * 0.22 * SR))
        return out

    return _strikes(rng, n, period=rng.uniform(1.0, 1.4), jitter=0.1, make=triple)


def _tick(rng, n):
    def tick(rng):
        t = _t(int(0.01 * SR))
        return np.sin(2 * np.pi * 5000 * t) * np.exp(-t * 800)

    return _strikes(rng, n, period=0.5, jitter=0.01, make=tick)


def _engine(rng, n):
    t = _t(n)
    f0 = rng.uniform(35, 60)  # firing rate
    hum = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 7))
    coarse = rng.standard_normal(n // 100 + 2)  # noise at 441 Hz, interpolated: a cheap low rumble
    rumble = np.interp(np.arange(n) / 100, np.arange(len(coarse)), coarse)
    return (hum + 0.5 * rumble) * (1 + 0.3 * np.sin(2 * np.pi * f0 / 4 * t)) * _env(n, 0.2, 0.2)


def _whistle(rng, n):
    t = _t(n)
    f = rng.uniform(1800, 2400) * (1 + 0.01 * np.sin(2 * np.pi * 5 * t))  # steady tone, light vibrato
    return np.sin(2 * np.pi * np.cumsum(f) / SR) * _env(n, 0.05, 0.1)


def _phone(rng, n):
    def ring(rng):
        t = _t(int(0.8 * SR))
        return (np.sin(2 * np.pi * 440 * t) + np.sin(2 * np.pi * 480 * t)) * _env(len(t), 0.01, 0.01)

    return _strikes(rng, n, period=1.6, jitter=0.02, make=ring)


def _drum(rng, n):
    def hit(rng):
        t = _t(int(0.3 * SR))
        f = 60 + 60 * np.exp(-t * 30)  # pitch drop of a membrane
        return np.sin(2 * np.pi * np.cumsum(f) / SR) * np.exp(-t * 12)

    return _strikes(rng, n, period=rng.uniform(0.25, 0.4), jitter=0.02, make=hit)


@dataclass(frozen=True)
class Event:
    name: str
    make: Callable
    clauses: tuple[str, ...]  # "a dog barks": a full clause
    nouns: tuple[str, ...]  # "the barking of a dog": for "followed by ..."
    gain: float = 1.0


EVENTS = (
    Event("bell", _bell, ("a bell rings", "a church bell tolls", "bells chime", "a bell is ringing"),
          ("the ringing of a bell", "a church bell", "chiming bells")),
    Event("dog", _bark, ("a dog barks", "a dog is barking", "a dog barks loudly", "a small dog yaps"),
          ("a barking dog", "the barking of a dog", "dog barks")),
    Event("siren", _siren, ("a siren wails", "an ambulance siren blares", "a police siren sounds",
                            "a siren is wailing"),
          ("a wailing siren", "the sound of a siren", "an emergency siren")),
    Event("birds", _birds, ("birds chirp", "a bird is singing", "birds tweet", "small birds are chirping"),
          ("birdsong", "chirping birds", "the tweeting of birds"), gain=0.6),
    Event("knock", _knock, ("someone knocks on a door", "a person knocks on wood", "there is knocking",
                            "someone is knocking"),
          ("a knock on the door", "knocking", "loud knocks")),
    Event("clock", _tick, ("a clock ticks", "a clock is ticking", "a watch ticks steadily",
                           "a clock ticks loudly"),
          ("the ticking of a clock", "a ticking clock", "steady ticking"), gain=1.2),
    Event("engine", _engine, ("an engine runs", "a motor hums", "a car engine idles", "an engine is running"),
          ("a running engine", "the hum of a motor", "an idling engine"), gain=0.7),
    Event("whistle", _whistle, ("someone whistles", "a whistle blows", "a person is whistling",
                                "a high whistle sounds"),
          ("a whistle", "a shrill whistle", "whistling"), gain=0.5),
    Event("phone", _phone, ("a phone rings", "a telephone is ringing", "a cell phone rings",
                            "the telephone rings"),
          ("a ringing phone", "the ring of a telephone", "a phone ringing"), gain=0.6),
    Event("drum", _drum, ("a drum beats", "someone plays a drum", "a drum is being hit", "drums pound"),
          ("drum beats", "the pounding of a drum", "a beating drum")),
)


# ----------------------------------------------------------------------------------------------
# Five backgrounds: noise textures
# ----------------------------------------------------------------------------------------------
def _rain(rng, n):
    hiss = _shaped_noise(rng, n, 1500, 16000, tilt=-2)
    drops = np.zeros(n)
    idx = rng.integers(0, n, size=int(n / SR * 150))
    drops[idx] = rng.uniform(0.5, 3.0, size=len(idx))
    drops = np.convolve(drops, np.exp(-np.arange(200) / 30.0), mode="same")
    return hiss + 0.5 * drops


def _wind(rng, n):
    gust = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.15, 0.3) * _t(n) + rng.uniform(0, 6.3))
    return _shaped_noise(rng, n, 40, 900, tilt=-4) * gust


def _water(rng, n):
    babble = _shaped_noise(rng, n, 300, 3000)
    return babble * (1 + 0.5 * _shaped_noise(rng, n, 2, 20))  # fast bubbling modulation


def _traffic(rng, n):
    return _shaped_noise(rng, n, 20, 300, tilt=-6) * (1 + 0.3 * np.sin(2 * np.pi * 0.1 * _t(n)))


def _room(rng, n):
    return 0.05 * _shaped_noise(rng, n, 50, 8000)


@dataclass(frozen=True)
class Background:
    name: str
    make: Callable
    phrases: tuple[str, ...]  # appended to a caption: " in the rain"
    level: float


BACKGROUNDS = (
    Background("rain", _rain, (" in the rain", " while rain falls", " with heavy rain in the background",
                               " as rain pours down"), 0.25),
    Background("wind", _wind, (" in strong wind", " with wind blowing", " while the wind howls",
                               " on a windy day"), 0.35),
    Background("water", _water, (" next to a stream", " with running water nearby", " by a flowing river",
                                 " near splashing water"), 0.2),
    Background("traffic", _traffic, (" with traffic rumbling in the distance", " on a busy street",
                                     " near a road with passing cars", " with city traffic behind"), 0.35),
    Background("quiet", _room, (" in a quiet room", " in silence", " indoors, otherwise quiet",
                                " in a calm room"), 1.0),
)


# ----------------------------------------------------------------------------------------------
# Descriptions and captions
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Description:
    background: int  # index into BACKGROUNDS
    events: tuple[int, ...]  # one or two indices into EVENTS
    relation: str  # "single" | "then" (events[0] before events[1]) | "while" (overlapping)


def all_descriptions() -> list[Description]:
    """Every distinct description: 50 single, 450 ordered pairs, 225 simultaneous pairs."""
    out = []
    for b in range(len(BACKGROUNDS)):
        out += [Description(b, (e,), "single") for e in range(len(EVENTS))]
        out += [Description(b, (a, c), "then") for a, c in itertools.permutations(range(len(EVENTS)), 2)]
        out += [Description(b, (a, c), "while") for a, c in itertools.combinations(range(len(EVENTS)), 2)]
    return out


def _sentence(s: str) -> str:
    return s[0].upper() + s[1:]


def captions_for(d: Description, rng: np.random.Generator, n: int = 5) -> list[str]:
    """n different captions for a description: synonyms, and several ways to say the order."""
    bg = BACKGROUNDS[d.background]
    ev = [EVENTS[i] for i in d.events]

    def pick(options):
        return options[rng.integers(len(options))]

    if d.relation == "single":
        templates = [
            lambda a, b: f"{pick(a.clauses)}{pick(bg.phrases)}",
            lambda a, b: f"{pick(a.clauses)} several times{pick(bg.phrases)}",
            lambda a, b: f"{pick(bg.phrases).strip()}, {pick(a.clauses)}",
            lambda a, b: f"{pick(a.nouns)} can be heard{pick(bg.phrases)}",
            lambda a, b: f"{pick(a.clauses)} repeatedly{pick(bg.phrases)}",
            lambda a, b: f"{pick(a.nouns)} over and over{pick(bg.phrases)}",
        ]
    elif d.relation == "then":
        templates = [
            lambda a, b: f"{pick(a.clauses)}, then {pick(b.clauses)}{pick(bg.phrases)}",
            lambda a, b: f"{pick(a.clauses)}, followed by {pick(b.nouns)}{pick(bg.phrases)}",
            lambda a, b: f"first {pick(a.clauses)} and afterwards {pick(b.clauses)}{pick(bg.phrases)}",
            lambda a, b: f"{pick(b.clauses)} after {pick(a.clauses)}{pick(bg.phrases)}",
            lambda a, b: f"{pick(a.clauses)}{pick(bg.phrases)}, and later {pick(b.clauses)}",
            lambda a, b: f"{pick(a.nouns)} and then {pick(b.nouns)}{pick(bg.phrases)}",
        ]
    else:
        templates = [
            lambda a, b: f"{pick(a.clauses)} while {pick(b.clauses)}{pick(bg.phrases)}",
            lambda a, b: f"{pick(a.clauses)} and {pick(b.clauses)} at the same time{pick(bg.phrases)}",
            lambda a, b: f"{pick(b.clauses)} as {pick(a.clauses)}{pick(bg.phrases)}",
            lambda a, b: f"{pick(a.nouns)} and {pick(b.nouns)} together{pick(bg.phrases)}",
            lambda a, b: f"{pick(b.clauses)} while {pick(a.clauses)}{pick(bg.phrases)}",
            lambda a, b: f"{pick(a.nouns)} mixed with {pick(b.nouns)}{pick(bg.phrases)}",
        ]
    a, b = ev[0], ev[-1]
    out: list[str] = []
    for k in rng.permutation(len(templates)):
        for _ in range(8):  # a few tries for a caption not yet used
            c = _sentence(templates[k](a, b))
            if c not in out:
                out.append(c)
                break
        if len(out) == n:
            break
    return out


def background_banks(seed: int, seconds: float = 30.0) -> list[np.ndarray]:
    """One long recording per background; clips cut theirs from it (like field recordings, and fast)."""
    n = int(seconds * SR)
    return [b.make(np.random.default_rng([seed, 1000 + k]), n) for k, b in enumerate(BACKGROUNDS)]


def synthesize(
    d: Description, rng: np.random.Generator, duration: float, banks: list[np.ndarray] | None = None
) -> np.ndarray:
    """The clip of a description: background plus events placed in time; float32, peak 0.8.

    ``banks`` (from background_banks) supplies the background by a random cut; without it the
    background is synthesized for this clip alone.
    """
    n = int(duration * SR)
    bg = BACKGROUNDS[d.background]
    if banks is None:
        texture = bg.make(rng, n)
    else:
        bank = banks[d.background]
        start = rng.integers(0, len(bank))
        texture = bank[(start + np.arange(n)) % len(bank)] * rng.uniform(0.7, 1.3)
    x = bg.level * 0.1 * texture
    if d.relation == "then":  # first event in the first part, second in the last part, with a gap
        cut = rng.uniform(0.42, 0.58)
        spans = [(rng.uniform(0.0, 0.08), cut - 0.05), (cut + 0.05, rng.uniform(0.92, 1.0))]
    elif d.relation == "while":
        spans = [(rng.uniform(0.0, 0.15), rng.uniform(0.85, 1.0)) for _ in range(2)]
    else:
        start = rng.uniform(0.0, 0.3)
        spans = [(start, min(1.0, start + rng.uniform(0.5, 0.9)))]
    for e, (a, b) in zip(d.events, spans, strict=True):
        m = max(1, int((b - a) * n))
        sig = EVENTS[e].make(rng, m)
        sig = sig / (np.max(np.abs(sig)) + 1e-9) * EVENTS[e].gain * rng.uniform(0.25, 0.4)
        _place(x, sig * _env(m), int(a * n))
    return (0.8 * x / (np.max(np.abs(x)) + 1e-9)).astype(np.float32)  # peak at -2 dBFS


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
def split_descriptions(cfg: DemoConfig, split: str) -> list[Description]:
    """The descriptions of a split's clips, in file order: distinct (a seeded permutation of all)."""
    descriptions = all_descriptions()
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split)])
    return [descriptions[i] for i in rng.permutation(len(descriptions))[: cfg.sizes()[split]]]


def make_demo_data(
    out: str | os.PathLike, cfg: DemoConfig | None = None, show_progress: bool = True
) -> dict[str, int]:
    """Write the demo dataset to ``out``; returns clips per split. Deterministic for ``cfg.seed``."""
    cfg = cfg or DemoConfig()
    out = Path(out)
    n_max = len(all_descriptions())
    for split, n in cfg.sizes().items():
        if not 0 <= n <= n_max:
            raise ClothoRetrieveError(
                f"demo-data: --n-{split} must be between 0 and {n_max} "
                "(the number of distinct descriptions)"
            )
    if cfg.duration < 0.1:
        raise ClothoRetrieveError("demo-data: --duration must be at least 0.1 s")
    banks = background_banks(cfg.seed, seconds=float(np.clip(6 * cfg.duration, 10, 30)))
    progress = Progress(
        TextColumn("demo-data {task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err_console, disable=not show_progress,
    )
    with progress:
        for s_idx, (split, n) in enumerate(cfg.sizes().items()):
            task = progress.add_task(split, total=n)
            (out / split).mkdir(parents=True, exist_ok=True)
            rows = []
            for i, d in enumerate(split_descriptions(cfg, split)):
                clip_rng = np.random.default_rng([cfg.seed, s_idx, i])
                duration = cfg.duration * clip_rng.uniform(0.8, 1.2)
                name = f"{split}_{i:04d}.wav"
                _write_wav(out / split / name, synthesize(d, clip_rng, duration, banks))
                rows.append([name, *captions_for(d, clip_rng)])
                progress.advance(task)
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(["file_name"] + [f"caption_{k}" for k in range(1, 6)])
            writer.writerows(rows)
            atomic_write_text(out / captions_name(split), buf.getvalue())
    atomic_write_text(out / "demo_config.json", json.dumps(asdict(cfg), indent=2) + "\n")
    return cfg.sizes()


def _write_wav(path: Path, wave: np.ndarray) -> None:
    import soundfile as sf

    with atomic_path(path, suffix=".wav") as tmp:
        sf.write(str(tmp), wave, SR, subtype="PCM_16", format="WAV")
