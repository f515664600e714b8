"""The names hpcad gives the telemetry's nodes (``data.node_names``): SLURM's, where they differ.

Telemetry often names a node otherwise than SLURM does: a fully qualified host name
(``r207n02.leonardo.local``), a Prometheus ``instance`` (``r207n02:9100``), an LDMS
``component_id``. Job context (``data.jobs``), incident lists (``data.labels``) and the nightly
job's drain commands speak SLURM's ``NodeName``s, and before, such a site's job file was refused
as naming none of its nodes, and its drain lines named hosts SLURM does not know.

Input: a CSV (or Parquet) file with the columns ``node`` (the name in the telemetry) and ``name``
(the name hpcad uses from ingest on: models, alarms, reports, drain lines), e.g. written by
``sinfo -N -h -o '%n,%N'`` (NodeHostname, NodeName) under a ``node,name`` header. Names the file
does not list are kept; a node listed twice with different names, and two nodes given one name, are
errors naming them.
"""
from __future__ import annotations

from pathlib import Path

from hpcad.data.tables import read_node_map
from hpcad.errors import InputError


def read_node_names(path: str | Path) -> dict[str, str]:
    """``data.node_names`` as telemetry name -> hpcad name (see the module); errors name the file and line."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"data.node_names: {path.resolve()} does not exist")
    return read_node_map(path, "name", "data.node_names",
                         " (node: the name in the telemetry; name: the name to use, e.g. SLURM's NodeName)")


class NodeRenamer:
    """Gives each node its ``data.node_names`` name, refusing two nodes one name."""

    def __init__(self, path: str | Path | None):
        self.path = path
        self.names = read_node_names(path) if path else {}
        self.given: dict[str, str] = {}  # hpcad name -> the telemetry name that took it

    def __call__(self, node: str) -> str:
        name = self.names.get(node, node)
        first = self.given.setdefault(name, node)
        if first != node:
            raise InputError(f"nodes {first!r} and {node!r} of the telemetry both become {name!r}"
                             + (f" (data.node_names={self.path})" if self.path else ""))
        return name


def check_unique(nodes: list[str], path: str | Path | None) -> None:
    """The nodes every rank ingested (each renamed its share) hold no name twice."""
    seen: set[str] = set()
    twice = sorted({n for n in nodes if n in seen or seen.add(n)})
    if twice:
        raise InputError(f"{len(twice)} name(s) given to two nodes of the telemetry (data.node_names={path}): "
                         f"{', '.join(twice[:10])}")
