"""Several relevant clips per query (DCASE 2025): rankings worked by hand, a brute force, the one-clip case,
and the --relevance CSV reader."""

from __future__ import annotations

import numpy as np
import pytest

from clotho_retrieve.metrics import (
    multi_relevance_metrics,
    read_relevance_csv,
    text_to_audio_metrics,
)
from clotho_retrieve.utils import ClothoRetrieveError

# Query 0: c0 (irrelevant) first; c1 and c2 tie at 0.8, both relevant -> ranks 2 and 3; c5 relevant, last.
# Query 1: c4 (0.9) first; c0 relevant but tied at 0.7 with irrelevant c1, c2 -> after them: rank 4;
#          c3 relevant -> rank 5; c2 is judged with relevance 0 (not relevant).
SIM = np.array(
    [
        [0.9, 0.8, 0.8, 0.5, 0.3, 0.1],
        [0.7, 0.7, 0.7, 0.2, 0.9, 0.0],
    ]
)
RELEVANT = [{1: 1.0, 2: 0.5, 5: 1.0}, {0: 1.0, 3: 2.0, 2: 0.0}]


def test_by_hand_with_ties_and_several_relevant_clips():
    ap0 = (1 / 2 + 2 / 3 + 3 / 6) / 3  # relevant at ranks 2, 3, 6; min(|R|, 16) = 3
    ap1 = (1 / 4 + 2 / 5) / 2  # relevant at ranks 4, 5
    m = multi_relevance_metrics(SIM, RELEVANT)
    assert m == pytest.approx({"R@1": 0.0, "R@5": 1.0, "R@10": 1.0, "mAP@16": (ap0 + ap1) / 2})

    m = multi_relevance_metrics(SIM, RELEVANT, k=4, ks=(2, 3, 4))
    ap0, ap1 = (1 / 2 + 2 / 3) / 3, (1 / 4) / 2  # only ranks <= 4 count; still normalised by min(|R|, 4)
    assert m == pytest.approx({"R@2": 0.5, "R@3": 0.5, "R@4": 1.0, "mAP@4": (ap0 + ap1) / 2})

    m = multi_relevance_metrics(SIM, RELEVANT, k=2, ks=(1,))
    assert m["mAP@2"] == pytest.approx(((1 / 2) / 2 + 0.0) / 2)  # query 0: min(3, 2) = 2


def test_graded_relevance_threshold():
    # min_relevance 1.0: query 0 loses c2 (0.5) -> c2 is an irrelevant tie of c1: c1 ranks 3; c5 ranks 6
    m = multi_relevance_metrics(SIM, RELEVANT, min_relevance=1.0, ks=(1, 2))
    ap0 = (1 / 3 + 2 / 6) / 2
    ap1 = (1 / 4 + 2 / 5) / 2
    assert m == pytest.approx({"R@1": 0.0, "R@2": 0.0, "mAP@16": (ap0 + ap1) / 2})
    with pytest.raises(ClothoRetrieveError, match="query 0 has no relevant clip"):
        multi_relevance_metrics(SIM, RELEVANT, min_relevance=1.5)


def brute_force(sim: np.ndarray, relevant: list[set[int]], k: int, ks) -> dict[str, float]:
    """Sort each row (score descending, irrelevant first among ties) and walk the list."""
    first, aps = [], []
    for s, rel in zip(sim, relevant, strict=True):
        is_rel = np.isin(np.arange(len(s)), sorted(rel))
        order = np.lexsort((is_rel.astype(int), -s))
        hits, ap, best = 0, 0.0, None
        for r, j in enumerate(order, start=1):
            if is_rel[j]:
                hits += 1
                best = best or r
                ap += hits / r if r <= k else 0.0
        first.append(best)
        aps.append(ap / min(len(rel), k))
    out = {f"R@{K}": float(np.mean(np.array(first) <= K)) for K in ks}
    out[f"mAP@{k}"] = float(np.mean(aps))
    return out


@pytest.mark.parametrize("chunk_size", [0, 1, 5])
@pytest.mark.parametrize("k", [1, 3, 16])
def test_against_brute_force(chunk_size, k):
    rng = np.random.default_rng(k)
    n_queries, n_clips = 13, 40
    sim = np.round(rng.normal(size=(n_queries, n_clips)), 1)  # rounding creates ties
    relevant = [set(rng.choice(n_clips, size=rng.integers(1, 25), replace=False).tolist()) for _ in sim]
    for q, rel in enumerate(relevant):
        sim[q, sorted(rel)] += 0.5
    judged = [{c: 1.0 for c in rel} for rel in relevant]
    got = multi_relevance_metrics(sim, judged, k=k, ks=(1, 5, 10), chunk_size=chunk_size)
    assert got == pytest.approx(brute_force(sim, relevant, k, (1, 5, 10)))
    assert 0.0 < got[f"mAP@{k}"] < 1.0


def test_column_order_does_not_matter():
    rng = np.random.default_rng(1)
    sim = np.round(rng.normal(size=(9, 30)), 1)
    judged = [{int(c): 1.0 for c in rng.choice(30, size=4, replace=False)} for _ in sim]
    perm = rng.permutation(30)  # new column j holds old column perm[j]
    inverse = np.argsort(perm)
    moved = [{int(inverse[c]): v for c, v in j.items()} for j in judged]
    assert multi_relevance_metrics(sim[:, perm], moved) == pytest.approx(multi_relevance_metrics(sim, judged))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_relevant_clip_is_the_dcase_2022_protocol(dtype):
    rng = np.random.default_rng(2)
    n_captions, n_clips = 50, 23
    target = rng.integers(0, n_clips, size=n_captions)
    sim = np.round(rng.normal(size=(n_captions, n_clips)), 1).astype(dtype)
    sim[np.arange(n_captions), target] += 0.7
    sim[:3] = 0.25  # whole rows tied: pessimistic rank n_clips
    got = multi_relevance_metrics(sim, [{int(t): 1.0} for t in target], k=10)
    assert got == pytest.approx(text_to_audio_metrics(sim, target))


def test_bad_inputs():
    with pytest.raises(ClothoRetrieveError, match="2 query rows but 1 relevance sets"):
        multi_relevance_metrics(SIM, RELEVANT[:1])
    with pytest.raises(ClothoRetrieveError, match=r"must lie in \[0, 6\)"):
        multi_relevance_metrics(SIM, [{6: 1.0}, {0: 1.0}])
    with pytest.raises(ClothoRetrieveError, match="k must be positive"):
        multi_relevance_metrics(SIM, RELEVANT, k=0)


# ----------------------------------------------------------------------------------------------
# --relevance FILE
# ----------------------------------------------------------------------------------------------
CLIPS = ["a.wav", "b.wav", "c.wav"]


def write(tmp_path, text: str, name: str = "rel.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_read_relevance_csv(tmp_path):
    path = write(
        tmp_path,
        "caption,file_name,relevance\n"
        "a dog barks,b.wav,1\n"
        "rain on a roof,a.wav,0.5\n"
        "a dog barks,c.wav,0\n"
        '"a dog barks",a.wav,2\n',
    )
    judged = read_relevance_csv(path, CLIPS)
    assert judged.queries == ["a dog barks", "rain on a roof"]
    assert judged.relevant == [{1: 1.0, 2: 0.0, 0: 2.0}, {0: 0.5}]
    # the queries and judgements drive the metric directly
    sim = np.array([[0.1, 0.9, 0.5], [0.2, 0.3, 0.4]])
    m = multi_relevance_metrics(sim, judged.relevant, ks=(1,))
    assert m == pytest.approx({"R@1": 0.5, "mAP@16": ((1 + 2 / 3) / 2 + 1 / 3) / 2})


def test_read_relevance_csv_with_query_ids(tmp_path):
    path = write(tmp_path, "query_id,file_name,relevance\nq1,c.wav,1\nq2,a.wav,1\nq1,a.wav,1\n")
    judged = read_relevance_csv(path, CLIPS, query_texts={"q1": "door creaking", "q2": "wind"})
    assert judged.queries == ["door creaking", "wind"]
    assert judged.relevant == [{2: 1.0, 0: 1.0}, {0: 1.0}]
    with pytest.raises(ClothoRetrieveError, match="holds ids, but no query texts"):
        read_relevance_csv(path, CLIPS)
    with pytest.raises(ClothoRetrieveError, match=r"line 3: unknown query_id 'q2'"):
        read_relevance_csv(path, CLIPS, query_texts={"q1": "door creaking"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("caption,file\nx,a.wav\n", r"expected a header with file_name, relevance"),
        ("caption,query,file_name,relevance\nx,y,a.wav,1\n", "one query column"),
        (
            "caption,file_name,relevance\nx,a.wav,1\nx,z.wav,1\n",
            r"line 3: file_name 'z.wav' is not among the 3",
        ),
        ("caption,file_name,relevance\nx,a.wav,high\n", r"line 2: relevance 'high' is not a number >= 0"),
        ("caption,file_name,relevance\nx,a.wav,-1\n", r"line 2: relevance '-1'"),
        ("caption,file_name,relevance\nx,a.wav,nan\n", r"line 2: relevance 'nan'"),
        ("caption,file_name,relevance\nx,a.wav,\n", r"line 2: relevance ''"),
        ("caption,file_name,relevance\n,a.wav,1\n", "line 2: empty caption"),
        (
            "caption,file_name,relevance\nx,a.wav,1\ny,b.wav,1\nx,a.wav,0\n",
            r"line 4: 'a.wav' judged again .*line 2",
        ),
        ("caption,file_name,relevance\nx,a.wav,1\ny,b.wav,0\n", "query 'y' has no clip with relevance"),
        ("caption,file_name,relevance\n", "no judgements"),
        ("", "found nothing"),
    ],
)
def test_read_relevance_csv_errors_name_file_and_line(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ClothoRetrieveError, match=message) as err:
        read_relevance_csv(path, CLIPS)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_read_relevance_csv_unreadable(tmp_path):
    with pytest.raises(ClothoRetrieveError, match="unreadable relevance CSV"):
        read_relevance_csv(tmp_path / "missing.csv", CLIPS)
    path = tmp_path / "latin1.csv"
    path.write_bytes("caption,file_name,relevance\ncaf\xe9,a.wav,1\n".encode("latin-1"))
    with pytest.raises(ClothoRetrieveError, match="unreadable relevance CSV"):
        read_relevance_csv(path, CLIPS)


# ----------------------------------------------------------------------------------------------
# Chance level: the closed form against every ranking of a few clips
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_clips,n_relevant,k", [(5, [2, 1, 5], 3), (6, [3], 16), (4, [2], 2), (1, [1], 16)])
def test_chance_equals_the_mean_over_every_ranking(n_clips, n_relevant, k):
    import itertools

    from clotho_retrieve.metrics import multi_relevance_chance

    ks = (1, 2, 5)
    totals = {f"R@{K}": 0.0 for K in ks} | {f"mAP@{k}": 0.0}
    orders = list(itertools.permutations(range(n_clips)))
    for order in orders:  # clip order[r] at rank r + 1: scores n, n-1, ... (no ties)
        sim = np.empty((len(n_relevant), n_clips))
        sim[:, list(order)] = np.arange(n_clips, 0, -1)
        relevant = [{c: 1.0 for c in range(m)} for m in n_relevant]
        for key, value in multi_relevance_metrics(sim, relevant, k=k, ks=ks).items():
            totals[key] += value / len(orders)
    assert multi_relevance_chance(n_clips, n_relevant, k=k, ks=ks) == pytest.approx(totals)


def test_chance_with_one_relevant_clip_is_dcase_2022s():
    from clotho_retrieve.experiments import chance_level
    from clotho_retrieve.metrics import multi_relevance_chance

    chance = multi_relevance_chance(1045, [1] * 3, k=10)
    assert chance == pytest.approx(chance_level(1045))  # R@k = k/N, mAP@10 = (1/N) sum_{r<=10} 1/r
    with pytest.raises(ClothoRetrieveError, match="relevant clips"):
        multi_relevance_chance(4, [5])
