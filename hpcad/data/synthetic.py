"""Seeded synthetic HPC telemetry: heterogeneous nodes, jobs, idle gaps and labelled faults.

Each node runs a sequence of jobs (per-core utilisation, instructions per cycle, memory-boundness,
GPU use). An ondemand-like governor sets core frequency from utilisation; instructions per second,
power, temperatures and fans follow from frequency and load. Idle periods are dropped (their rows
are absent, so timestamps jump), as in the seed lecture's data. Labelled anomalies:

1 ``powersave``: frequency pinned to the minimum: ips and power fall while util stays high.
2 ``performance``: frequency pinned to the maximum: power and temperatures rise.
3 ``memleak`` (HPAS leak): used memory climbs steadily, then swap.
4 ``cpu_contention`` (HPAS cpuoccupy): a hog process fills idle cores and steals cycles: util,
  load and context switches rise, the job's ips falls.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np

from hpcad.data.node import NodeData

ANOMALY_CODES = {"powersave": 1, "performance": 2, "memleak": 3, "cpu_contention": 4}
# the metric families (hpcad.explain.metric_family) each fault moves, as the docstring says: what an
# explanation should name (hpcad/bench/explain.py measures it)
FAULT_FAMILIES = {1: ("ips", "pow"), 2: ("pow", "temp"), 3: ("mem", "swap"),
                  4: ("util", "load1", "ctx", "procs", "ips")}
SOCKETS, CORES = 2, 16
STEP_S = 300
START_EPOCH = 1_736_121_600  # 2025-01-06T00:00:00Z


def metric_names(profile: str = "cluster") -> list[str]:
    """Metric columns: 160 for ``cluster``, the lecture's 159 for ``davide``."""
    names = ["ambient_temp"]
    for kind in ("cmbw", "ips", "util", "temp"):
        names += [f"{kind}_p{s}_{c}" for s in range(SOCKETS) for c in range(CORES)]
    names += ["pow_p0", "pow_p1", "pow_mem0", "pow_mem1", "pow_node"]
    names += [f"pow_gpu{g}" for g in range(4)] + [f"gpu_temp{g}" for g in range(4)]
    names += [f"gpu_util{g}" for g in range(4)]
    names += ["mem_used", "swap_used", "ctx_switches", "procs_running", "load1",
              "net_rx", "net_tx", "ib_rx", "ib_tx", "fan0", "fan1", "fan2", "fan3", "mem_cached"]
    if profile == "davide":
        names = names[:-1]
    elif profile != "cluster":
        raise ValueError(f"data.synthetic.profile: unknown profile {profile!r} (cluster or davide)")
    return names


def _node_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _segments(rng: np.random.Generator, rows: int, mean_len: float) -> np.ndarray:
    """Segment id per row for segments of geometric length."""
    lengths = rng.geometric(1.0 / mean_len, size=rows // 2 + 2)
    return np.repeat(np.arange(lengths.size), lengths)[:rows]


def _place_anomalies(rng: np.random.Generator, rows: int, clean_fraction: float,
                     anomaly_fraction: float, kinds: list[str]) -> np.ndarray:
    labels = np.zeros(rows, dtype=np.int8)
    start0 = int(rows * clean_fraction)
    budget = int((rows - start0) * anomaly_fraction)
    codes = [ANOMALY_CODES[k] for k in kinds]
    rng.shuffle(codes)
    placed, tries, n_intervals = 0, 0, 0
    while placed < budget and codes and tries < 1000:
        tries += 1
        length = int(rng.integers(12, 72))
        start = int(rng.integers(start0, max(start0 + 1, rows - length)))
        window = labels[max(0, start - 24): start + length + 24]
        if window.any():
            continue
        labels[start:start + length] = codes[n_intervals % len(codes)]  # every kind in turn
        placed += length
        n_intervals += 1
    return labels


def _lag(x: np.ndarray) -> np.ndarray:
    """First-order lag along rows, starting settled: y[0] = x[0], y[t] = 0.4 x[t] + 0.6 y[t-1]. The
    same operations, in the same order, as ``scipy.signal.lfilter([0.4], [1, -0.6], x, zi=0.6 x[0])``
    (bit for bit), without importing scipy.signal (0.6 s of every start-up that generates data)."""
    y = np.empty(x.shape, dtype=np.float64)
    prev = x[0]
    for t in range(len(x)):
        prev = x[t] * 0.4 + prev * 0.6
        y[t] = prev
    return y


def generate_node(name: str, rows: int, seed: int = 0, profile: str = "cluster",
                  clean_fraction: float = 0.45, anomaly_fraction: float = 0.12,
                  kinds: list[str] | None = None) -> NodeData:
    """Generate one node's non-idle rows; the same (seed, name) always gives the same data."""
    metric_names(profile)  # validates the profile
    if kinds is None:
        kinds = ["powersave", "performance"] if profile == "davide" else list(ANOMALY_CODES)
    unknown = set(kinds) - set(ANOMALY_CODES)
    if unknown:
        raise ValueError(f"data.synthetic.kinds: unknown anomaly kinds {sorted(unknown)}; known: {list(ANOMALY_CODES)}")
    rng = _node_rng(seed, name)
    T, C = rows, SOCKETS * CORES
    # Node personality: hardware spread and a preferred job mix.
    eff = rng.normal(1.0, 0.05)
    r_th = rng.normal(0.35, 0.04)
    p_idle = rng.normal(90.0, 8.0)
    amb0 = rng.normal(22.0, 1.5)
    mix_ipc, mix_mem, mix_gpu = rng.uniform(0.8, 2.2), rng.uniform(0.1, 0.7), rng.uniform(0.1, 0.9)

    # Idle gaps: rows are only the non-idle 5-minute periods; timestamps jump over idle spans.
    steps = np.ones(T, dtype=np.int64)
    gap_rows = rng.random(T) < 0.01
    steps[gap_rows] = rng.integers(6, 288, size=int(gap_rows.sum()))
    timestamp = START_EPOCH + STEP_S * np.cumsum(steps)

    # Jobs come from a handful of recurring applications per node (each with its own utilisation,
    # core count, instructions per cycle, memory-boundness, GPU use and memory), run with jitter.
    job = _segments(rng, T, mean_len=60.0)
    n_jobs = int(job.max()) + 1
    n_apps = int(rng.integers(5, 9))
    a_util = np.clip(rng.normal(0.8, 0.15, n_apps), 0.3, 1.0)
    a_cores = rng.integers(8, C + 1, n_apps)
    a_ipc = np.clip(rng.normal(mix_ipc, 0.4, n_apps), 0.3, 3.0)
    a_mem = np.clip(rng.normal(mix_mem, 0.2, n_apps), 0.0, 1.0)
    a_gpu = (rng.random(n_apps) < mix_gpu) * rng.uniform(0.3, 1.0, n_apps)
    a_memgb = rng.uniform(20, 180, n_apps)
    a_net = rng.lognormal(3.0, 1.0, n_apps)
    app = rng.choice(n_apps, size=n_jobs, p=rng.dirichlet(np.ones(n_apps) * 2.0))
    j_util = np.clip(a_util[app] + rng.normal(0, 0.03, n_jobs), 0.25, 1.0)
    j_cores = a_cores[app]
    j_ipc = a_ipc[app] * rng.normal(1.0, 0.04, n_jobs)
    j_mem = np.clip(a_mem[app] + rng.normal(0, 0.03, n_jobs), 0.0, 1.0)
    j_gpu = np.clip(a_gpu[app] + rng.normal(0, 0.03, n_jobs) * (a_gpu[app] > 0), 0.0, 1.0)
    j_memgb = a_memgb[app] * rng.normal(1.0, 0.05, n_jobs)
    j_net = a_net[app] * rng.lognormal(0.0, 0.1, n_jobs)

    core_idx = np.arange(C)
    active = core_idx[None, :] < j_cores[job][:, None]  # [T, C]
    util = np.where(active, j_util[job][:, None], 0.03)
    util = np.clip(util + rng.normal(0, 0.04, (T, C)), 0.0, 1.0)
    ipc = j_ipc[job][:, None] * (1 + rng.normal(0, 0.05, (T, C)))
    mem = j_mem[job][:, None] * np.ones((1, C))
    labels = _place_anomalies(rng, T, clean_fraction, anomaly_fraction, kinds)

    f_min, f_max = 2.0, 3.8  # GHz
    freq = f_min + (f_max - f_min) * np.clip(util, 0.0, 1.0) ** 2  # ondemand-like: scales with load
    hog = np.zeros((T, C))
    a_ps, a_pf = labels == 1, labels == 2
    a_leak, a_cont = labels == 3, labels == 4
    freq[a_ps] = f_min
    util[a_ps] = np.clip(util[a_ps] + 0.02 * active[a_ps], 0, 1)  # slower cores: the job keeps them busy
    freq[a_pf] = f_max
    if a_cont.any():
        hog[a_cont] = np.where(active[a_cont], 0.35, 0.95)
        freq[a_cont] = f_max * 0.98
    # Memory-bound work is less sensitive to frequency.
    ips = util * (1 - hog * 0.5) * freq * 1e9 * ipc * (1 - 0.5 * mem * (1 - f_min / freq)) * eff
    util_seen = np.clip(util + hog * (1 - util), 0, 1)
    cmbw = util * mem * 9.0 * (0.6 + 0.4 * freq / f_max) * (1 + rng.normal(0, 0.05, (T, C)))
    core_pw = 1.1 * util_seen * (freq / f_max) ** 2.6 * 6.0 + 0.4
    pow_s = np.stack([core_pw[:, :CORES].sum(1), core_pw[:, CORES:].sum(1)], 1) + 18.0 * eff
    pow_mem = 8.0 + cmbw.reshape(T, SOCKETS, CORES).sum(2) * 0.35
    gpu_u = np.clip(j_gpu[job][:, None] + rng.normal(0, 0.05, (T, 4)), 0, 1)
    pow_gpu = 45 + 250 * gpu_u * (1 + rng.normal(0, 0.03, (T, 4)))
    amb = amb0 + 1.5 * np.sin(2 * np.pi * timestamp / 86400.0) + rng.normal(0, 0.2, T)
    # Temperatures follow power with a first-order lag (a few 5-minute steps).
    temp = _lag(amb[:, None] + 8 + r_th * core_pw * 8.0) + rng.normal(0, 0.3, (T, C))
    gpu_temp = _lag(amb[:, None] + 10 + 0.12 * pow_gpu) + rng.normal(0, 0.4, (T, 4))
    pow_node = p_idle + pow_s.sum(1) + pow_mem.sum(1) + pow_gpu.sum(1) + rng.normal(0, 3, T)
    fan_base = 3000 + 80 * (temp.max(1) - 40)
    fans = fan_base[:, None] * (1 + rng.normal(0, 0.02, (T, 4)))

    mem_used = j_memgb[job] + rng.normal(0, 1.5, T)
    swap = np.abs(rng.normal(0, 0.05, T))
    if a_leak.any():  # the leak grows through each leak interval
        run_id = np.cumsum(np.diff(np.r_[0, a_leak.astype(int)]) == 1)
        pos = np.zeros(T)
        for r in np.unique(run_id[a_leak]):
            idx = np.flatnonzero(a_leak & (run_id == r))
            pos[idx] = np.arange(idx.size)
        grow = 4.0 * pos * a_leak
        mem_used = mem_used + grow
        over = np.maximum(mem_used - 240.0, 0)
        mem_used, swap = np.minimum(mem_used, 240.0), swap + over
    procs = active.sum(1) + rng.poisson(2, T) + a_cont * 24
    ctx = (4000 + 300 * procs) * (1 + rng.normal(0, 0.05, T)) * (1 + 2.5 * a_cont)
    load1 = util_seen.sum(1) + rng.normal(0, 0.3, T) + a_cont * 6
    net = j_net[job][:, None] * (1 + rng.normal(0, 0.1, (T, 4))) * np.array([1.0, 0.8, 40.0, 38.0])
    mem_cached = 30 + 0.2 * mem_used + rng.normal(0, 1.0, T)

    cols = [amb[:, None], cmbw, ips, util_seen, temp, pow_s, pow_mem, pow_node[:, None], pow_gpu,
            gpu_temp, gpu_u, mem_used[:, None], swap[:, None], ctx[:, None], procs[:, None].astype(float),
            load1[:, None], net, fans, mem_cached[:, None]]
    values = np.concatenate(cols, axis=1)
    if profile == "davide":  # the lecture's data: 159 metrics, each min-max normalised to [0, 1]
        values = values[:, :-1]
        lo, hi = values.min(0), values.max(0)
        values = (values - lo) / np.where(hi > lo, hi - lo, 1.0)
    return NodeData(name, timestamp.astype(np.int64), values.astype(np.float32), labels)


def node_names(n: int) -> list[str]:
    return [f"node{i:04d}" for i in range(n)]


def generate_cluster(nodes: int, rows: int, seed: int = 0, profile: str = "cluster",
                     clean_fraction: float = 0.45, anomaly_fraction: float = 0.12,
                     kinds: list[str] | None = None) -> Iterator[NodeData]:
    """Yield nodes one at a time (never the whole cluster in memory). Row counts vary by node."""
    for i, name in enumerate(node_names(nodes)):
        n_rows = rows if profile == "davide" else int(rows * (1.0 - 0.15 * (i % 3) / 2))
        yield generate_node(name, n_rows, seed, profile, clean_fraction, anomaly_fraction, kinds)


def node_frame(node: NodeData, profile: str = "cluster"):
    """One node as an export table: ISO timestamp, metrics, anomaly label."""
    import pandas as pd

    frame = pd.DataFrame(node.values.astype(np.float64), columns=metric_names(profile))
    frame.insert(0, "timestamp", pd.to_datetime(node.timestamp, unit="s", utc=True).strftime("%Y-%m-%dT%H:%M:%SZ"))
    frame["anomaly"] = node.labels.astype(int)
    return frame


def write_exports(out, s, fmt: str = "csv") -> list:
    """Write the synthetic data set as export files: one CSV/Parquet per node (davide: one CSV file)."""
    from pathlib import Path

    out = Path(out)
    if fmt not in ("csv", "parquet", "ldms", "long"):
        raise ValueError(f"generate.format={fmt!r}: csv, parquet (wide), ldms or long")
    if fmt in ("ldms", "long") and s.profile != "davide":
        from hpcad.data import exports

        nodes_all = list(generate_cluster(s.nodes, s.rows, s.seed, s.profile, s.clean_fraction, s.anomaly_fraction,
                                          None if s.kinds is None else list(s.kinds)))
        write = exports.write_ldms if fmt == "ldms" else exports.write_long
        return write(nodes_all, metric_names(s.profile), out)
    nodes = generate_cluster(s.nodes, s.rows, s.seed, s.profile, s.clean_fraction, s.anomaly_fraction,
                             None if s.kinds is None else list(s.kinds))
    written = []
    if s.profile == "davide":
        out.parent.mkdir(parents=True, exist_ok=True)
        davide_frame(next(iter(nodes))).to_csv(out, index=False)
        return [out]
    out.mkdir(parents=True, exist_ok=True)
    for node in nodes:
        frame = node_frame(node, s.profile)
        path = out / f"{node.name}.{fmt}"
        frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path, index=False)
        written.append(path)
    return written


def davide_frame(node: NodeData):
    """The lecture's CSV shape (161 columns) from a node generated with ``profile='davide'``."""
    import pandas as pd

    frame = pd.DataFrame(node.values.astype(np.float64), columns=metric_names("davide"))
    frame.insert(0, "timestamp", pd.to_datetime(node.timestamp, unit="s").strftime("%Y-%m-%d %H:%M:%S"))
    frame["anomaly"] = node.labels.astype(int)
    return frame
