"""Day-partitioned recommender logs for sequential training (paper 3.1, 3.2 RQ1, 5.1.2).

Two logs share one small interface, :class:`DayLog` (``features``, ``tasks``,
``num_days``, ``day(d)``), which :mod:`clippy_monitor.testbed.protocol` streams
through ``tf.data``:

* :class:`SyntheticLog` -- a seeded log of N "days" with hundreds of features
  whose feature and label distributions drift from day to day, with occasional
  sudden shifts (RQ1), and labels for every task from a hidden ground truth;
* :class:`KuaiRandLog` -- the real KuaiRand-27K subset shipped with the package
  (14 days, 41,828 interactions; see ``data/kuairand/ATTRIBUTION.md``).

Nothing is downloaded.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np

from clippy_monitor.testbed.models import FeatureSpec, Task

Features = dict[str, np.ndarray]  # {"categorical": int32[n, n_cat], "dense": float32[n, n_dense]}
Labels = dict[str, np.ndarray]  # {task: float32[n]}


class DayLog(Protocol):
    """A log split into days, oldest first; the last day is the evaluation day (5.1.2)."""

    features: FeatureSpec
    tasks: tuple[Task, ...]

    @property
    def num_days(self) -> int: ...

    def day(self, d: int) -> tuple[Features, Labels]: ...


def subset(features: Features, labels: Labels, rows: np.ndarray | slice) -> tuple[Features, Labels]:
    """The given rows of one day."""
    return {k: v[rows] for k, v in features.items()}, {k: v[rows] for k, v in labels.items()}


# --------------------------------------------------------------------------
# Synthetic log
# --------------------------------------------------------------------------
SYNTHETIC_TASKS: tuple[Task, ...] = (
    Task("click", "binary"),
    Task("like", "binary"),
    Task("share", "binary"),
    Task("follow", "binary"),
    Task("watch_time", "regression"),  # log1p of a heavy-tailed watch time
    Task("dwell", "regression"),  # heavy-tailed (Student-t noise), not log-transformed
)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Shape and dynamics of a :class:`SyntheticLog`.

    Attributes:
        num_days: N; days 0..N-2 train, day N-1 evaluates.
        rows_per_day: interactions generated per day.
        n_dense, n_categorical, vocab_size: input features (``vocab_size`` ids each).
        informative: fraction of the dense features the ground truth reads.
        latent_dim: width of the hidden ground truth's user-item state.
        drift: daily random-walk step of feature means / log-scales, of category
            popularity and of the ground truth.
        shift_days: days that start with a sudden shift (RQ1): a quarter of the dense
            features jump in mean and scale, and popularity is reshuffled for a quarter
            of the categorical features.
        shift_size: size of the jump, in feature standard deviations.
        tail_df: degrees of freedom of the Student-t noise of the regression
            targets (smaller = heavier tails).
        tasks: the tasks to label (binary tasks, ``watch_time``, and other regression targets).
        seed: everything above is drawn from it; the same seed gives the same log.
    """

    num_days: int = 14
    rows_per_day: int = 8192
    n_dense: int = 160
    n_categorical: int = 40
    vocab_size: int = 200
    informative: float = 0.25
    latent_dim: int = 8
    drift: float = 0.05
    shift_days: tuple[int, ...] = (6,)
    shift_size: float = 5.0
    tail_df: float = 2.5
    tasks: tuple[Task, ...] = SYNTHETIC_TASKS
    seed: int = 0


class SyntheticLog:
    """A seeded synthetic recommender log (see :class:`SyntheticConfig`).

    The hidden ground truth: a user-item state ``z = tanh(A x_std / 2 + sum_f E_f[id_f] / 4)``
    (``latent_dim`` wide; ``x_std`` = the informative dense features standardised
    by the day's own statistics) drives every task, so tasks are correlated as in
    a real ranking model.  Binary labels are Bernoulli(sigmoid(3 w_t . z + b_t));
    ``watch_time`` is ``log1p`` of a log-normal time with Student-t tails; other
    regression targets are ``w_t . z`` plus Student-t noise.  ``A`` and ``E`` drift
    slowly; the inputs' distribution drifts and jumps on ``shift_days``.
    """

    def __init__(self, config: SyntheticConfig = SyntheticConfig()) -> None:
        self.config = c = config
        self.tasks = tuple(c.tasks)
        self.features = FeatureSpec((c.vocab_size,) * c.n_categorical, c.n_dense)
        rng = np.random.default_rng([c.seed, 0xC11])
        k = c.latent_dim
        n_inf = max(1, round(c.informative * c.n_dense))
        self._informative = rng.choice(c.n_dense, n_inf, replace=False)
        a0 = rng.normal(0, 1.5 / np.sqrt(n_inf), (n_inf, k))
        e0 = rng.normal(0, 1.0 / np.sqrt(c.n_categorical), (c.n_categorical, c.vocab_size, k))
        self._task_w = {t.name: rng.normal(0, 1.5, k) for t in self.tasks}
        base_rates = {"click": 0.35, "like": 0.2, "share": 0.1, "follow": 0.1}
        self._task_b = {
            t.name: float(np.log(base_rates.get(t.name, 0.2) / (1 - base_rates.get(t.name, 0.2))))
            for t in self.tasks
        }
        zipf = 1.0 / np.arange(1, c.vocab_size + 1) ** 1.1
        self._cdf = np.cumsum(zipf / zipf.sum())

        # Day states, drawn in time order (a random walk with jumps on shift_days).
        self._cache: dict[int, tuple[Features, Labels]] = {}
        self._days: list[dict[str, np.ndarray]] = []
        # Day 0's dense features are standardised (as a feature pipeline would make
        # them); later days drift away from that, and jump on shift days.
        mean, log_scale = np.zeros(c.n_dense), np.zeros(c.n_dense)
        perm = np.stack([rng.permutation(c.vocab_size) for _ in range(c.n_categorical)])
        a, e = a0, e0
        for d in range(c.num_days):
            if d:
                mean = mean + c.drift * rng.normal(0, 1, c.n_dense)
                log_scale = log_scale + c.drift * rng.normal(0, 1, c.n_dense)
                a = a + c.drift * rng.normal(0, 1.5 / np.sqrt(n_inf), a.shape)
                e = e + c.drift * rng.normal(0, 1.0 / np.sqrt(c.n_categorical), e.shape)
                perm = perm.copy()
                for f in range(c.n_categorical):  # a few ranks swap every day
                    i, j = rng.integers(0, c.vocab_size, (2, max(1, int(c.drift * c.vocab_size))))
                    perm[f, i], perm[f, j] = perm[f, j], perm[f, i]
            if d in c.shift_days:
                jump = rng.choice(c.n_dense, c.n_dense // 4, replace=False)
                mean = mean.copy()
                log_scale = log_scale.copy()
                mean[jump] += (
                    c.shift_size * np.exp(log_scale[jump]) * rng.choice([-1, 1], len(jump))
                )
                log_scale[jump] += np.log1p(c.shift_size)
                for f in rng.choice(c.n_categorical, max(1, c.n_categorical // 4), replace=False):
                    perm[f] = rng.permutation(c.vocab_size)
            self._days.append(
                {"mean": mean, "scale": np.exp(log_scale), "perm": perm, "a": a, "e": e}
            )

    @property
    def num_days(self) -> int:
        return self.config.num_days

    def day(self, d: int) -> tuple[Features, Labels]:
        """The rows of day ``d`` (deterministic in ``(seed, d)``; cached)."""
        if not 0 <= d < self.num_days:
            raise IndexError(f"day {d} out of range 0..{self.num_days - 1}")
        if d not in self._cache:
            self._cache[d] = self._generate(d)
        return self._cache[d]

    def _generate(self, d: int) -> tuple[Features, Labels]:
        c, s = self.config, self._days[d]
        rng = np.random.default_rng([c.seed, d])
        n = c.rows_per_day
        dense = (s["mean"] + s["scale"] * rng.normal(0, 1, (n, c.n_dense))).astype(np.float32)
        ranks = np.searchsorted(self._cdf, rng.random((n, c.n_categorical)))
        ranks = np.minimum(ranks, c.vocab_size - 1)
        ids = s["perm"][np.arange(c.n_categorical), ranks]  # [n, n_cat]
        # The ground truth reads the dense features relative to today's distribution,
        # so a shift moves the inputs (and the model's view of them), not the labels.
        informative = self._informative
        standardized = (dense[:, informative] - s["mean"][informative]) / s["scale"][informative]
        z = np.tanh(
            standardized @ s["a"] / 2.0 + 0.25 * s["e"][np.arange(c.n_categorical), ids].sum(axis=1)
        )
        labels: Labels = {}
        for t in self.tasks:
            signal = z @ self._task_w[t.name]
            if t.kind == "binary":
                p = 1.0 / (1.0 + np.exp(-(3.0 * signal + self._task_b[t.name])))
                labels[t.name] = (rng.random(n) < p).astype(np.float32)
            elif t.name == "watch_time":  # seconds, lognormal-ish with Student-t tails, then log1p
                seconds = np.exp(2.5 + 1.2 * signal + 0.3 * rng.standard_t(c.tail_df, n))
                labels[t.name] = np.log1p(np.minimum(seconds, 1e6)).astype(np.float32)
            else:
                labels[t.name] = (signal + 0.5 * rng.standard_t(c.tail_df, n)).astype(np.float32)
        return {"categorical": ids.astype(np.int32), "dense": dense}, labels


# --------------------------------------------------------------------------
# KuaiRand
# --------------------------------------------------------------------------
KUAIRAND_BINARY = ("is_click", "long_view", "label", "is_comment", "is_follow", "is_forward")
KUAIRAND_TASKS: tuple[Task, ...] = (
    *(Task(n, "binary") for n in KUAIRAND_BINARY),
    Task("play_time", "regression"),
)
KUAIRAND_FILE = "processed_standard_kcore_15.tsv"


def kuairand_path() -> Path:
    """The shipped KuaiRand-27K subset (package data, CC BY-SA 4.0; see its ATTRIBUTION.md)."""
    return Path(
        str(resources.files("clippy_monitor.testbed") / "data" / "kuairand" / KUAIRAND_FILE)
    )


class KuaiRandLog:
    """The KuaiRand-27K subset as 14 days (2022-04-08 .. 2022-04-21), one per ``date``.

    Inputs: categorical ``user_id``, ``video_id``, hour of day, weekday; dense
    ``log1p(duration_ms)`` (standardised) and the hour as sin/cos.  Labels:
    ``is_click``, ``long_view``, ``label`` (like=1 / hate=0), ``is_comment``,
    ``is_follow``, ``is_forward`` (binary) and ``play_time`` = ``log1p(play_time_ms)``
    (regression).  Post-exposure columns (``comment_stay_time``, ``is_profile_enter``)
    are not used as inputs.  The subset is strongly selection-biased: only rows
    with an explicit like or hate were kept (see ATTRIBUTION.md).
    """

    def __init__(
        self, path: str | Path | None = None, tasks: tuple[Task, ...] = KUAIRAND_TASKS
    ) -> None:
        self.path = Path(path) if path is not None else kuairand_path()
        self.tasks = tuple(tasks)
        with open(self.path, newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            header = next(reader)
            columns = list(zip(*reader))
        raw = {name: np.asarray(col) for name, col in zip(header, columns)}
        self.num_rows = len(raw["date"])
        dates = raw["date"].astype(np.int64)
        order = np.lexsort((raw["time_ms"].astype(np.int64), dates))  # time order
        raw = {k: v[order] for k, v in raw.items()}
        dates = dates[order]
        self.dates = np.unique(dates)
        day_index = np.searchsorted(self.dates, dates)

        _, user = np.unique(raw["user_id"], return_inverse=True)
        _, video = np.unique(raw["video_id"], return_inverse=True)
        hour = raw["hourmin"].astype(np.int64) // 100
        weekday = np.array(
            [
                datetime.date(int(x) // 10000, int(x) // 100 % 100, int(x) % 100).weekday()
                for x in self.dates
            ]
        )[day_index]
        duration = np.log1p(raw["duration_ms"].astype(np.float64))
        angle = 2 * np.pi * hour / 24
        self.features = FeatureSpec((int(user.max()) + 1, int(video.max()) + 1, 24, 7), 3)
        categorical = np.stack([user, video, hour, weekday], axis=1).astype(np.int32)
        dense = np.stack(
            [(duration - duration.mean()) / duration.std(), np.sin(angle), np.cos(angle)], axis=1
        ).astype(np.float32)
        labels = {n: raw[n].astype(np.float32) for n in KUAIRAND_BINARY}
        labels["play_time"] = np.log1p(raw["play_time_ms"].astype(np.float64)).astype(np.float32)
        self._days = []
        for d in range(len(self.dates)):
            rows = np.flatnonzero(day_index == d)
            self._days.append(
                (
                    {"categorical": categorical[rows], "dense": dense[rows]},
                    {t.name: labels[t.name][rows] for t in self.tasks},
                )
            )

    @property
    def num_days(self) -> int:
        return len(self.dates)

    def day(self, d: int) -> tuple[Features, Labels]:
        return self._days[d]


# --------------------------------------------------------------------------
# Views used by the ablations of Table 3 (appendix A.1)
# --------------------------------------------------------------------------
class FeatureSubset:
    """``log`` with only the first ``keep`` fraction of its dense and categorical features."""

    def __init__(self, log: DayLog, keep: float = 0.5) -> None:
        self.log = log
        self._dense = max(1, round(log.features.n_dense * keep))
        self._cat = max(1, round(log.features.n_categorical * keep))
        self.features = FeatureSpec(log.features.vocab_sizes[: self._cat], self._dense)
        self.tasks = log.tasks

    @property
    def num_days(self) -> int:
        return self.log.num_days

    def day(self, d: int) -> tuple[Features, Labels]:
        features, labels = self.log.day(d)
        return {
            "categorical": features["categorical"][:, : self._cat],
            "dense": features["dense"][:, : self._dense],
        }, labels


class TaskSubset:
    """``log`` without the tasks named in ``drop``."""

    def __init__(self, log: DayLog, drop: tuple[str, ...]) -> None:
        unknown = set(drop) - {t.name for t in log.tasks}
        if unknown:
            raise ValueError(f"unknown task(s) {sorted(unknown)}")
        self.log = log
        self.features = log.features
        self.tasks = tuple(t for t in log.tasks if t.name not in drop)

    @property
    def num_days(self) -> int:
        return self.log.num_days

    def day(self, d: int) -> tuple[Features, Labels]:
        features, labels = self.log.day(d)
        return features, {t.name: labels[t.name] for t in self.tasks}
