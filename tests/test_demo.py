"""The synthetic demo dataset: Clotho's layout, determinism, distinct descriptions, events in order."""

from __future__ import annotations

import csv
import hashlib
import re

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from clotho_retrieve import demo
from clotho_retrieve.cli import app
from clotho_retrieve.demo import (
    BACKGROUNDS,
    EVENTS,
    SR,
    DemoConfig,
    Description,
    all_descriptions,
    captions_for,
    make_demo_data,
    split_descriptions,
    synthesize,
)
from clotho_retrieve.utils import ClothoRetrieveError

TINY = DemoConfig(n_development=6, n_validation=3, n_evaluation=3, duration=1.0, seed=7)


def _digest(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo_data(out, TINY, show_progress=False)
    return out


def test_clotho_layout(tiny):
    for split, n in TINY.sizes().items():
        rows = _rows(tiny / f"clotho_captions_{split}.csv")
        assert list(rows[0]) == ["file_name"] + [f"caption_{k}" for k in range(1, 6)]
        assert len(rows) == n
        wavs = sorted(p.name for p in (tiny / split).glob("*.wav"))
        assert wavs == sorted(r["file_name"] for r in rows)
        for r in rows:
            info = sf.info(str(tiny / split / r["file_name"]))
            assert (info.samplerate, info.channels, info.subtype, info.format) == (SR, 1, "PCM_16", "WAV")
            assert 0.8 * TINY.duration - 1e-3 <= info.duration <= 1.2 * TINY.duration + 1e-3
            captions = [r[f"caption_{k}"] for k in range(1, 6)]
            assert all(c and c[0].isupper() for c in captions)
            assert len(set(captions)) == 5


def test_deterministic_for_a_seed(tiny, tmp_path):
    make_demo_data(tmp_path / "again", TINY, show_progress=False)
    assert _digest(tmp_path / "again") == _digest(tiny)
    other = DemoConfig(**{**TINY.__dict__, "seed": 8, "n_validation": 0, "n_evaluation": 0})
    make_demo_data(tmp_path / "other", other, show_progress=False)
    a, b = _digest(tmp_path / "other"), _digest(tiny)
    assert a["development/development_0000.wav"] != b["development/development_0000.wav"]


def _mentions(caption: str, phrases) -> bool:
    return any(p.strip().lower() in caption.lower() for p in phrases)


def test_descriptions_distinct_and_named_in_captions():
    cfg = DemoConfig()  # the default sizes used by `make demo`
    for split in ("development", "validation", "evaluation"):
        ds = split_descriptions(cfg, split)
        assert len(ds) == cfg.sizes()[split] == len(set(ds))
    rng = np.random.default_rng(0)
    for d in all_descriptions()[:: 7]:
        for c in captions_for(d, rng):
            for e in d.events:  # every caption names every event and the background
                assert _mentions(c, EVENTS[e].clauses + EVENTS[e].nouns), (c, d)
            assert _mentions(c, BACKGROUNDS[d.background].phrases), (c, d)


def test_order_words_distinguish_relations():
    rng = np.random.default_rng(1)
    seq = Description(0, (0, 1), "then")
    for c in captions_for(seq, rng):
        assert re.search(r"then|followed|after|later", c), c
        first = min(c.lower().find(p) for p in EVENTS[0].clauses + EVENTS[0].nouns if p in c.lower())
        second = min(c.lower().find(p) for p in EVENTS[1].clauses + EVENTS[1].nouns if p in c.lower())
        # "B after A" names B first; every other template names A first
        assert (first < second) != (" after " in c), c
    for c in captions_for(Description(0, (0, 1), "while"), rng):
        assert re.search(r"while|same time|together|mixed| as ", c), c


def _band_energy(x: np.ndarray, lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / SR)
    return float(spec[(f >= lo) & (f < hi)].sum())


def test_events_are_placed_in_order():
    whistle = [e.name for e in EVENTS].index("whistle")  # steady tone near 2 kHz
    drum = [e.name for e in EVENTS].index("drum")  # membrane hits below 130 Hz
    quiet = [b.name for b in BACKGROUNDS].index("quiet")
    x = synthesize(Description(quiet, (whistle, drum), "then"), np.random.default_rng(3), 4.0)
    first, last = x[: len(x) * 2 // 5], x[len(x) * 3 // 5 :]
    assert _band_energy(first, 1700, 2500) > 20 * _band_energy(last, 1700, 2500)
    assert _band_energy(last, 40, 130) > 20 * _band_energy(first, 40, 130)
    assert np.max(np.abs(x)) <= 0.8 + 1e-6


def test_event_kinds_have_distinct_spectra():
    """Mean log spectra of the ten kinds differ pairwise (a learnable signature for each)."""
    quiet = [b.name for b in BACKGROUNDS].index("quiet")
    profiles = []
    for e in range(len(EVENTS)):
        x = synthesize(Description(quiet, (e,), "single"), np.random.default_rng(e), 2.0)
        spec = np.abs(np.fft.rfft(x)) ** 2
        bands = np.array_split(spec[: len(spec) * 8000 // (SR // 2)], 32)  # 32 bands up to 8 kHz
        p = 10 * np.log10(np.array([b.mean() for b in bands]) + 1e-12)
        profiles.append(p - p.max())
    for i in range(len(EVENTS)):
        for j in range(i + 1, len(EVENTS)):
            assert np.abs(profiles[i] - profiles[j]).mean() > 3.0, (EVENTS[i].name, EVENTS[j].name)


def test_short_clips_and_size_limits(tmp_path):
    cfg = DemoConfig(n_development=2, n_validation=0, n_evaluation=0, duration=0.3)
    make_demo_data(tmp_path, cfg, show_progress=False)
    assert sf.info(str(tmp_path / "development" / "development_0000.wav")).frames >= 0.24 * SR
    assert len(_rows(tmp_path / "clotho_captions_validation.csv")) == 0
    with pytest.raises(ClothoRetrieveError, match="n-development"):
        make_demo_data(tmp_path, DemoConfig(n_development=len(all_descriptions()) + 1), show_progress=False)


def test_cli(tmp_path):
    result = CliRunner().invoke(app, ["demo-data", "--out", str(tmp_path), "--n-development", "2",
                                      "--n-validation", "1", "--n-evaluation", "1", "--duration", "0.5"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "evaluation").glob("*.wav"))) == 1
    bad = CliRunner().invoke(app, ["demo-data", "--out", str(tmp_path), "--n-evaluation", "100000"])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert demo.DemoConfig().n_development == 250
