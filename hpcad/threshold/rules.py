"""Threshold rules, chosen by config group (``threshold=cost|level|quantile|pot``) through ``_target_``.

Each rule's ``fit`` takes a callable that yields :class:`~hpcad.errorstore.NodeSignal` per node (it may be
called more than once: cluster scope makes passes instead of holding every node's rows) and returns
:class:`Thresholds`. ``scope=node`` fits one threshold per node on its own validation rows;
``scope=cluster`` fits one threshold on per-node normalised signals (signal / the node's mean
held-out training signal), by summing cost curves or histograms over a shared grid, so memory
does not grow with the number of nodes. The cost rule's ``scope=auto`` chooses between the two on
the labelled validation rows (:meth:`CostRule.choose_scope`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcad.atomic import write_json
from hpcad.dist import CLUSTER_WIDE
from hpcad.errors import ConfigError
from hpcad.preprocess import TEST, TRAIN, VAL
from hpcad.errorstore import NodeSignal
from hpcad.threshold.cost import CostModel, CostTerms, drift_smoothed_curve, grid_step, level_counts
from hpcad.threshold.reduce import Reducer

log = logging.getLogger(__name__)
SignalSource = Callable[[], Iterator[NodeSignal]]
ALWAYS = 0.9  # share of fitted rows alarmed from which a threshold is reported as "always alarm"
NOT_NORMAL = 10.0  # median signal_norm of the rows a node's fit took as normal, from which they are named


def alarms_always(alarmed: int | np.integer, rows: int | np.integer) -> bool:
    """Whether ``alarmed`` of a node's ``rows`` fitted rows make its threshold "always alarm" (``ALWAYS``)."""
    return bool(alarmed >= ALWAYS * rows)


@dataclass
class Thresholds:
    rule: str
    scope: str
    cluster: float | None = None
    nodes: dict[str, float] = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    @property
    def normalised(self) -> bool:
        return self.scope == "cluster"

    def signal_of(self, s: NodeSignal) -> np.ndarray:
        return s.normalised if self.normalised else s.signal

    def threshold_for(self, node: str) -> float:
        if self.scope == "cluster":
            return float(self.cluster)  # type: ignore[arg-type]
        if node not in self.nodes:
            raise ConfigError(f"node {node}: no fitted threshold (fitted on other nodes?)")
        return self.nodes[node]

    def to_dict(self) -> dict:
        """The nodes sorted by name: the same file whatever the number of ranks that fitted them."""
        return {"rule": self.rule, "scope": self.scope, "signal": "signal_norm" if self.normalised else "signal",
                "cluster": self.cluster, "nodes": dict(sorted(self.nodes.items())), "details": self.details}

    @classmethod
    def from_dict(cls, d: dict) -> "Thresholds":
        return cls(d["rule"], d["scope"], d.get("cluster"), dict(d.get("nodes", {})), d.get("details", {}))

    @classmethod
    def load(cls, path: Path) -> "Thresholds":
        """``thresholds.json`` as :meth:`save` wrote it."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())


def _fit_rows(s: NodeSignal) -> np.ndarray:
    """Validation rows, or training rows where a node has no validation part."""
    rows = s.split == VAL
    return rows if rows.any() else s.split == TRAIN


def _grid(lo: float, hi: float, n: int) -> np.ndarray:
    """asinh-spaced grid: fine near zero, coarse in the heavy tail, any sign."""
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ConfigError("threshold: no finite validation signal to fit on")
    hi = hi if hi > lo else lo + 1.0
    return np.sinh(np.linspace(np.arcsinh(lo), np.arcsinh(hi), n))


def _tolerance(value: int) -> int:
    """``threshold.tolerance``: rows either side of an anomaly within which an alarm counts as its
    detection (a negative one had been taken and silently changed every cost)."""
    if int(value) != value or value < 0:
        raise ConfigError(f"threshold.tolerance={value}: must be a whole number of rows >= 0")
    return int(value)


def _check_scope(scope: str, scopes: tuple[str, ...]) -> str:
    if scope not in scopes:
        raise ConfigError(f"threshold.scope={scope!r}: expected node, cluster" + (" or auto" if "auto" in scopes else
                          " (auto: with threshold=cost only, which chooses on labels)"))
    return scope


class _Rule:
    name = "rule"
    scopes: tuple[str, ...] = ("node", "cluster")  # threshold.scope values this rule takes
    red: Reducer = Reducer()
    normal_only = False  # unsupervised rules model the normal rows' tail: labelled anomalies are left out

    def rows(self, s: NodeSignal) -> np.ndarray:
        """The rows a threshold is fitted on: validation (or training) rows, less labelled anomalies
        for the unsupervised rules when labels exist."""
        rows = _fit_rows(s)
        if self.normal_only and s.labels is not None and (rows & (s.labels == 0)).any():
            rows = rows & (s.labels == 0)
        return rows

    def unsupervised_rows(self, s: NodeSignal) -> np.ndarray | None:
        """The rows this fit took as normal because no label marks them (None: labels decided)."""
        return self.rows(s) if self.normal_only else None

    def __init__(self, scope: str = "node", grid_points: int = 4096, c_alarm: float = 1.0,
                 c_missed: float = 5.0, tolerance: int = 12, **_: object):
        self.scope = _check_scope(scope, self.scopes)
        self.grid_points = int(grid_points)
        if self.grid_points < 16:
            raise ConfigError(f"threshold.grid_points={grid_points}: must be >= 16 (the thresholds' search grid)")
        self.cost_model = CostModel(float(c_alarm), float(c_missed), _tolerance(tolerance))
        for name, c in (("c_alarm", c_alarm), ("c_missed", c_missed)):
            if not (np.isfinite(float(c)) and float(c) >= 0):
                raise ConfigError(f"threshold.{name}={c}: must be a cost >= 0")
        if float(c_alarm) + float(c_missed) <= 0:
            raise ConfigError("threshold.c_alarm and threshold.c_missed are both 0: every threshold would cost "
                              "nothing")

    def fit(self, source: SignalSource, red: Reducer | None = None, detector: str = "autoencoder") -> Thresholds:
        """Fit on the nodes ``source`` yields; with an MPI reducer, each rank passes its own nodes.
        The result says in ``details["check"]`` whether it would never or always alarm on the rows
        it was fitted on (also logged as a warning naming the ``detector``)."""
        self.red = red or Reducer()
        th = self.thresholds(source)
        self.fitted(th, detector)
        th.details["check"] = check_thresholds(th, source, self.red, detector, self.unsupervised_rows)
        return th

    def thresholds(self, source: SignalSource) -> Thresholds:
        """The fit alone (no check, nothing logged), at this rule's scope, over ``self.red``'s ranks."""
        if self.scope == "node":
            th = Thresholds(self.name, "node")
            for s in source():
                rows = self.rows(s)
                if not rows.any():
                    raise ConfigError(f"node {s.node}: no validation or training rows to fit a threshold on")
                th.nodes[s.node] = self.fit_node(s, rows)
            th.nodes = self.red.merge(th.nodes)
            return th
        lo, hi = np.inf, -np.inf
        for s in source():
            v = s.normalised[_fit_rows(s)]
            v = v[np.isfinite(v)]
            if v.size:
                lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
        return self.fit_cluster(source, self.grid(self.red.min(lo), self.red.max(hi)))

    def fitted(self, th: Thresholds, detector: str) -> None:
        """Called with every rank's thresholds before they are checked: what the rule records of its fit."""

    def grid(self, lo: float, hi: float) -> np.ndarray:
        """Cluster scope: the thresholds tried, on the normalised signal."""
        return _grid(lo, hi, self.grid_points)

    def fit_node(self, s: NodeSignal, rows: np.ndarray) -> float:
        raise NotImplementedError

    def fit_cluster(self, source: SignalSource, grid: np.ndarray) -> Thresholds:
        raise NotImplementedError

    def _histogram(self, source: SignalSource, grid: np.ndarray) -> np.ndarray:
        """Counts of validation values <= each grid point (a reducible quantile sketch)."""
        counts = np.zeros(grid.size, dtype=np.int64)
        for s in source():
            v = np.sort(s.normalised[self.rows(s)])
            counts += np.searchsorted(v, grid, side="right")
        return self.red.sum(counts)

    def _quantile(self, source: SignalSource, grid: np.ndarray, q: float) -> tuple[float, int]:
        """The ``q`` quantile of the fitted rows' normalised signal over every node and rank, and their
        count, from two histogram passes: the grid, then a fine grid across the grid step that holds
        the quantile (the first fine point with a share q at or below it). One pass alone rounds up to
        the step's top, which in the sparse tail can be the largest value fitted on: a threshold that
        never alarms (DAVIDE's q = 0.995 of 1,072 rows sat on their maximum, 136.058, for 136.046)."""
        cdf = self._histogram(source, grid)
        target = q * cdf[-1]
        i = int(np.searchsorted(cdf, target, side="left"))
        if i == 0 or i >= grid.size:
            return float(grid[min(i, grid.size - 1)]), int(cdf[-1])
        fine = np.linspace(grid[i - 1], grid[i], self.grid_points)
        fcdf = self._histogram(source, fine)
        j = int(np.searchsorted(fcdf, target, side="left"))
        return float(fine[min(j, fine.size - 1)]), int(cdf[-1])


def check_thresholds(th: Thresholds, source: SignalSource, red: Reducer | None = None,
                     detector: str = "autoencoder",
                     unsupervised: Callable[[NodeSignal], np.ndarray | None] | None = None) -> dict:
    """How often the thresholds alarm on the rows they were fitted on: ``never_alarm`` (no row at all),
    ``always_alarm`` (at least ``ALWAYS`` of the rows, or of one node's rows at node scope) or ``ok``.
    A rule that ends in either is almost always a problem with the data or the signal scale, so it
    is logged. With ``unsupervised`` (a node's rows its fit took as normal, no label marking them; or None),
    nodes whose such rows have a median normalised signal of ``NOT_NORMAL`` or more are listed and
    logged too: that period looks nothing like the node's held-out training rows (incidents, a
    changed workload), so a threshold fitted there sits among its incidents."""
    red = red or Reducer()
    counts = np.zeros(2)
    always: list[str] = []
    not_normal: dict[str, float] = {}
    for s in source():
        rows = _fit_rows(s)
        alarmed = int((th.signal_of(s)[rows] > th.threshold_for(s.node)).sum())
        counts += (alarmed, int(rows.sum()))
        if th.scope == "node" and alarms_always(alarmed, rows.sum()):
            always.append(s.node)
        fit = unsupervised(s) if unsupervised is not None else None
        if fit is not None:
            v = s.normalised[fit]
            v = v[np.isfinite(v)]
            level = float(np.median(v)) if v.size else 0.0
            if level >= NOT_NORMAL:
                not_normal[s.node] = round(level, 1)
    counts = red.sum(counts)
    always = sorted(red.merge({n: 1 for n in always}))
    n_not_normal = int(red.sum(np.array([len(not_normal)]))[0])
    not_normal = red.merge(dict(_loudest(not_normal)))  # each rank sends its loudest only
    share = float(counts[0] / counts[1]) if counts[1] else 0.0
    verdict = "never_alarm" if counts[0] == 0 else "always_alarm" if share >= ALWAYS else "ok"
    out = {"fit_rows": int(counts[1]), "alarm_share": round(share, 6), "verdict": verdict}
    if always:
        out["always_alarm_nodes"] = always[:100]
        out["always_alarm_node_count"] = len(always)
    if verdict == "never_alarm":
        log.warning("%s threshold (%s, %s scope) raises no alarm on any of the %d rows it was fitted on: "
                    "it will probably never alarm", detector, th.rule, th.scope, out["fit_rows"], extra=CLUSTER_WIDE)
    elif verdict == "always_alarm":
        log.warning("%s threshold (%s, %s scope) alarms on %.0f%% of the rows it was fitted on",
                    detector, th.rule, th.scope, 100 * share, extra=CLUSTER_WIDE)
    elif always:
        log.warning("%s threshold (%s): %d nodes alarm on %.0f%% or more of their fitted rows (first: %s)",
                    detector, th.rule, len(always), 100 * ALWAYS, ", ".join(always[:5]), extra=CLUSTER_WIDE)
    if n_not_normal:
        loudest = _loudest(not_normal)
        out["not_normal_fit_nodes"] = dict(loudest)
        out["not_normal_fit_node_count"] = n_not_normal
        log.warning("%s threshold (%s): on %d node(s) the rows it took as normal (none labelled as anomalies) sit "
                    "far above the node's normal level (median signal %g times its held-out training level or more: "
                    "%s): that period likely holds incidents or a changed workload, and the threshold sits among "
                    "them; label them (data.label_column, threshold=cost), use a rule that takes no rows as normal "
                    "(threshold=level, or threshold.fallback=level with threshold=cost) or apply thresholds fitted on "
                    "a quiet period (train_run=)", detector, th.rule, n_not_normal, NOT_NORMAL,
                    ", ".join(f"{n} {v:g}x" for n, v in loudest[:5]), extra=CLUSTER_WIDE)
    return out


def fallback_setting(fallback: dict) -> str:
    """``times=5`` or ``q=0.995``: a fallback rule's setting as the log and the report say it."""
    return f"times={fallback['times']:g}" if "times" in fallback else f"q={fallback['q']:g}"


def _loudest(levels: dict[str, float], k: int = 100) -> list[tuple[str, float]]:
    """The ``k`` highest ``(node, level)`` pairs, highest first (ties by name)."""
    return sorted(levels.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


class QuantileRule(_Rule):
    """A high quantile ``q`` of the validation signal (unsupervised; labelled anomalies left out)."""

    name = "quantile"
    normal_only = True

    def __init__(self, q: float = 0.995, **kw: object):
        super().__init__(**kw)
        if not 0 < q < 1:
            raise ConfigError(f"threshold.q={q}: must be in (0, 1)")
        self.q = float(q)

    def fit_node(self, s: NodeSignal, rows: np.ndarray) -> float:
        return float(np.quantile(s.signal[rows], self.q))

    def fit_cluster(self, source: SignalSource, grid: np.ndarray) -> Thresholds:
        return Thresholds(self.name, "cluster", self._quantile(source, grid, self.q)[0], details={"q": self.q})


class LevelRule(_Rule):
    """A fixed multiple ``times`` of each node's normal level (unsupervised, no rows taken as normal).

    The normalised signal is the node's signal over its mean on held-out normal training rows (a
    baseline without error units: its spreads above their median), so ``times`` x that level means the
    same on every node: one threshold for the cluster, fitted on nothing. Unlike the quantile and POT
    rules it assumes nothing of the validation period: a period holding incidents (the real DAVIDE
    node's: over half its rows) does not lift it, and a healthy node does not alarm on a share of its
    rows by construction (docs/results.md, "Without labels")."""

    name = "level"

    def __init__(self, times: float = 5.0, **kw: object):
        super().__init__(**kw)
        if not (np.isfinite(times) and times > 0):
            raise ConfigError(f"threshold.times={times}: must be a positive multiple of the normal level")
        self.times = float(times)

    def fit(self, source: SignalSource, red: Reducer | None = None, detector: str = "autoencoder") -> Thresholds:
        th = super().fit(source, red, detector)
        th.details["times"] = self.times
        return th

    def fit_node(self, s: NodeSignal, rows: np.ndarray) -> float:
        return self.times * float(s.scale)

    def fit_cluster(self, source: SignalSource, grid: np.ndarray) -> Thresholds:
        return Thresholds(self.name, "cluster", self.times, details={"times": self.times})


def pot_threshold(values: np.ndarray, init: float, risk: float, n_total: int) -> tuple[float, dict]:
    """SPOT (Siffer et al., KDD 2017): GPD fitted to the peaks over ``init``; the quantile of ``risk``."""
    peaks = values[values > init] - init
    if peaks.size < 10:
        return float(values.max()), {"peaks": int(peaks.size), "note": "too few peaks; used the maximum"}
    from scipy.stats import genpareto  # here: scipy.stats costs 0.4 s of every hpcad start-up

    gamma, _, sigma = genpareto.fit(peaks, floc=0.0)
    r = risk * n_total / peaks.size
    z = init + (sigma / gamma * (r ** (-gamma) - 1) if abs(gamma) > 1e-8 else -sigma * np.log(r))
    return float(z), {"gamma": float(gamma), "sigma": float(sigma), "peaks": int(peaks.size), "init": float(init)}


class PotRule(_Rule):
    """Peaks over threshold: extreme-value tail fit above the ``init_q`` quantile (unsupervised;
    labelled anomalies left out)."""

    name = "pot"
    normal_only = True

    def __init__(self, init_q: float = 0.98, risk: float = 1e-4, **kw: object):
        super().__init__(**kw)
        if not (0 < init_q < 1 and 0 < risk < 1 - init_q):
            raise ConfigError(f"threshold.init_q={init_q}, threshold.risk={risk}: need 0 < risk < 1 - init_q < 1")
        self.init_q, self.risk = float(init_q), float(risk)

    def fit_node(self, s: NodeSignal, rows: np.ndarray) -> float:
        v = s.signal[rows]
        return pot_threshold(v, float(np.quantile(v, self.init_q)), self.risk, v.size)[0]

    def fit_cluster(self, source: SignalSource, grid: np.ndarray) -> Thresholds:
        init, n = self._quantile(source, grid, self.init_q)
        peaks = self.red.concat(np.concatenate([np.empty(0)] + [v[v > init] for v in
                                                                (s.normalised[self.rows(s)] for s in source())]))
        t, det = pot_threshold(np.r_[peaks, init], init, self.risk, n)
        return Thresholds(self.name, "cluster", t, details=det)


class CostRule(_Rule):
    """Minimise the lecture's cost on the labelled validation rows.

    With ``drift`` > 0 (the default) the threshold minimises the *expected* cost when every
    validation value may move by ``N(0, sigma^2)`` on the asinh scale of the normalised signal (a
    factor ``exp(sigma)`` for values well above normal), where ``sigma`` is ``drift`` times the
    distance on that scale between the labelled anomalies' typical level (median of their peaks)
    and the normal rows' typical level (lower quartile of the rows far from anomalies, so that up
    to three quarters of them may be unlabelled anomalies): the step cost curve convolved with a
    Gaussian whose width scales with the separation the labels show. The plain optimum sits right
    under the lowest labelled anomalies whenever a band of rows labelled normal scores as high
    (missing labels: the seed lecture's DAVIDE validation split has hundreds); then a later day
    whose anomalies are weaker, or whose normal level is higher, misses them. With ``drift=0`` the
    threshold is the exact optimum over all thresholds (the lecture's rule; cluster scope: on the
    grid).

    At node scope a smoothed choice that would alarm on ``ALWAYS`` or more of the node's fitted rows
    is replaced by that node's exact optimum. Where a labelled anomaly scores barely above the
    node's quiet rows and the jitter is wide (set by stronger anomalies), the expected cost is
    lowest far under every row: an alarm on every row, every night (docs/results.md, "A drift
    threshold that alarms on every row").
    """

    name = "cost"
    scopes = ("node", "cluster", "auto")

    def __init__(self, fallback: str = "level", times: float = 5.0, drift: float = 0.3, **kw: object):
        super().__init__(**kw)
        self.requested = self.scope  # node, cluster or auto (fit then sets self.scope to node or cluster)
        scope = "node" if self.scope == "auto" else self.scope
        rules = {"level": lambda: LevelRule(times, scope=scope, grid_points=self.grid_points),
                 "quantile": lambda: QuantileRule(scope=scope, grid_points=self.grid_points)}
        if fallback not in rules:
            raise ConfigError(f"threshold.fallback={fallback!r}: expected level or quantile")
        self.fallback: LevelRule | QuantileRule = rules[fallback]()
        if not (0 <= float(drift) <= 1):
            raise ConfigError(f"threshold.drift={drift}: must be in [0, 1] (0: the exact optimum)")
        self.drift = float(drift)
        self.unlabelled = 0  # node scope: nodes fitted by the fallback (no labels), this fit
        self.exact: list[str] = []  # node scope: nodes given the exact optimum (the smoothed one alarmed always)
        self.cluster_fell_back = False  # cluster scope: no node had labels, this fit

    def fit(self, source: SignalSource, red: Reducer | None = None, detector: str = "autoencoder") -> Thresholds:
        """As every rule; nodes without labels get the fallback rule's threshold, said in one line
        (before: one warning per node, thousands on an unlabelled cluster) and in ``details``."""
        self.unlabelled, self.cluster_fell_back, self.exact = 0, False, []
        choice = None
        if self.requested == "auto":
            self.red = red or Reducer()
            self.scope, choice = self.choose_scope(source, detector)
        th = super().fit(source, red, detector)
        if choice is not None:
            th.details["scope_choice"] = choice
        if self.scope == "node":
            n = int(self.red.sum(np.array([self.unlabelled]))[0])
            if n:
                th.details.update(unlabelled_nodes=n, fallback=self.fallback_details())
                log.warning("%s: %d of %d nodes have no labels: their thresholds come from the %s rule "
                            "(threshold.fallback, %s)", detector, n, len(th.nodes), self.fallback.name,
                            fallback_setting(th.details["fallback"]), extra=CLUSTER_WIDE)
        return th

    def choose_scope(self, source: SignalSource, detector: str) -> tuple[str, dict]:
        """``threshold.scope=auto``: the scope whose thresholds, fitted on the first half (in time) of
        every labelled node's validation rows, cost less on the second half, summed over the nodes
        and ranks. Per-node thresholds rest on the one or two labelled incidents a node's validation
        period holds; one threshold on the normalised signals pools every node's (docs/results.md,
        "Threshold scope chosen on the validation rows"). Node scope on a tie and where fewer than two
        nodes are labelled: there is nothing to pool."""

        def halves() -> Iterator[tuple[NodeSignal, np.ndarray]]:
            for s in source():
                v = np.flatnonzero(s.split == VAL) if s.labels is not None else np.empty(0, int)
                if v.size >= 2:
                    held = v[v.size // 2:]
                    split = s.split.copy()
                    split[held] = TEST  # out of the fit (a rule fits on validation rows only)
                    yield dataclasses.replace(s, split=split), held

        costs = {}
        for scope in ("node", "cluster"):
            sub = copy.copy(self)
            sub.scope = sub.requested = scope
            sub.exact = []  # its own list (fit has just reset the counters the copy starts from)
            th = sub.thresholds(lambda: (h for h, _ in halves()))
            mine, nodes = 0.0, 0
            for s, held in halves():
                mine += self.cost_model.cost(th.signal_of(s)[held], s.labels[held], th.threshold_for(s.node))
                nodes += 1
            total, labelled = self.red.sum(np.array([mine, nodes]))
            labelled = int(labelled)  # counted on the node pass: no pass of its own over the signals
            if labelled < 2:
                return "node", {"chosen": "node", "labelled_nodes": labelled, "how": "fewer than two labelled nodes"}
            costs[scope] = float(total)
        chosen = "cluster" if costs["cluster"] < costs["node"] else "node"
        log.info("%s: threshold scope %s (threshold.scope=auto: fitted on the first half of %d labelled nodes' "
                 "validation rows, cost on the second half: node %s, cluster %s)", detector, chosen, labelled,
                 f"{costs['node']:,.0f}", f"{costs['cluster']:,.0f}", extra=CLUSTER_WIDE)
        return chosen, {"chosen": chosen, "labelled_nodes": labelled, "second_half_cost": costs,
                        "how": "fitted on the first half of the validation rows, cost on the second"}

    def fitted(self, th: Thresholds, detector: str) -> None:
        """Nodes given the exact optimum (their smoothed threshold alarmed always): said before the check."""
        if self.scope != "node":
            return
        exact = sorted(self.red.merge({n: 1 for n in self.exact}))
        if exact:
            th.details.update(exact_optimum_nodes=exact[:100], exact_optimum_node_count=len(exact))
            log.warning("%s: on %d of %d nodes the drift-smoothed cost threshold would alarm on %.0f%% or more of "
                        "the validation rows (%s): those take the exact validation optimum (as threshold.drift=0)",
                        detector, len(exact), len(th.nodes), 100 * ALWAYS,
                        ", ".join(exact[:5]) + (", ..." if len(exact) > 5 else ""), extra=CLUSTER_WIDE)

    def fallback_details(self) -> dict:
        """The fallback rule and its setting, as ``thresholds.json`` records them."""
        fb = self.fallback
        return {"rule": fb.name, "times": fb.times} if isinstance(fb, LevelRule) else {"rule": fb.name, "q": fb.q}

    def unsupervised_rows(self, s: NodeSignal) -> np.ndarray | None:
        """An unlabelled node's rows where the quantile fallback fitted it (at cluster scope only when
        no node had labels: otherwise unlabelled nodes take no part in the fit); the level fallback
        takes no rows as normal."""
        if s.labels is None and (self.scope == "node" or self.cluster_fell_back):
            return self.fallback.unsupervised_rows(s)
        return None

    def grid(self, lo: float, hi: float) -> np.ndarray:
        if self.drift == 0:
            return super().grid(lo, hi)
        # room for the smoothing on the asinh scale: the whole separation either side of the data
        span = np.arcsinh(hi) - np.arcsinh(lo)
        u = np.linspace(np.arcsinh(lo) - span, np.arcsinh(hi) + span, self.grid_points)
        return np.sinh(u)

    def sigma(self, far: np.ndarray, peaks: np.ndarray, u_grid: np.ndarray) -> float:
        """The jitter for level histograms ``far``/``peaks`` on ``u_grid`` (see the class doc)."""
        if peaks.sum() == 0 or far.sum() == 0:
            return 0.0

        def quantile(counts: np.ndarray, q: float) -> float:
            c = np.cumsum(counts)
            return float(u_grid[min(int(np.searchsorted(c, q * c[-1])), u_grid.size - 1)])

        return self.drift * max(0.0, quantile(peaks, 0.5) - quantile(far, 0.25))

    def _smoothed_argmin(self, far: np.ndarray, peaks: np.ndarray, u_grid: np.ndarray) -> tuple[int, float, float]:
        sigma = self.sigma(far, peaks, u_grid)
        if sigma < grid_step(u_grid):  # no separation to speak of: the plain step curve on the grid
            total = self.cost_model.c_alarm * (far.sum() - np.cumsum(far)) + self.cost_model.c_missed * (
                np.cumsum(peaks) - peaks)
        else:
            total = drift_smoothed_curve(far, peaks, u_grid, sigma, self.cost_model)
        i = int(np.argmin(total))
        return i, float(total[i]), sigma

    def fit_node(self, s: NodeSignal, rows: np.ndarray) -> float:
        if s.labels is None:
            self.unlabelled += 1
            return self.fallback.fit_node(s, rows)

        def exact() -> float:
            terms = CostTerms.of(s.signal[rows], s.labels[rows] != 0, self.cost_model.tolerance)
            return self.cost_model.optimum(terms)[0]

        if self.drift == 0:
            return exact()
        u = np.arcsinh(s.normalised[rows])
        terms = CostTerms.of(u, s.labels[rows] != 0, self.cost_model.tolerance)
        span = max(float(u.max() - u.min()), 1e-9)
        grid = np.linspace(u.min() - span, u.max() + span, min(self.grid_points, 2048))
        i, _, _ = self._smoothed_argmin(level_counts(terms.far, grid), level_counts(terms.anom_peak, grid), grid)
        t = float(np.sinh(grid[i]) * s.scale)
        if alarms_always((s.signal[rows] > t).sum(), rows.sum()):  # as check_thresholds counts them
            self.exact.append(s.node)
            return exact()
        return t

    def fit_cluster(self, source: SignalSource, grid: np.ndarray) -> Thresholds:
        total = np.zeros(grid.size)
        far, peaks = np.zeros(grid.size), np.zeros(grid.size)
        u_grid = np.arcsinh(grid)
        labelled = 0
        for s in source():
            if s.labels is None:
                continue
            rows = _fit_rows(s)
            labelled += 1
            terms = CostTerms.of(s.normalised[rows], s.labels[rows] != 0, self.cost_model.tolerance)
            if self.drift == 0:
                total += self.cost_model.curve(terms, grid)
            else:  # histograms add across nodes and ranks; the smoothing is applied once to the sums
                far += level_counts(np.arcsinh(terms.far), u_grid)
                peaks += level_counts(np.arcsinh(terms.anom_peak), u_grid)
        labelled = int(self.red.sum(np.array([labelled]))[0])
        if labelled == 0:
            log.warning("no labelled node: cluster threshold from the %s rule (threshold.fallback, %s)",
                        self.fallback.name, fallback_setting(self.fallback_details()), extra=CLUSTER_WIDE)
            self.cluster_fell_back = True
            self.fallback.red = self.red
            th = self.fallback.fit_cluster(source, super().grid(grid[0], grid[-1]))
            th.details["fallback"] = self.fallback_details()
            return th
        if self.drift == 0:
            total = self.red.sum(total)
            i = int(np.argmin(total))
            details = {"validation_cost": float(total[i])}
        else:
            i, cost, sigma = self._smoothed_argmin(self.red.sum(far), self.red.sum(peaks), u_grid)
            details = {"expected_validation_cost": cost, "drift": self.drift, "sigma": sigma}
        return Thresholds(self.name, "cluster", float(grid[i]), details={**details, "labelled_nodes": labelled})
