"""Light retraining in the spirit of LARA (Chen et al., WWW 2024, arXiv 2310.05668).

When a node's normal behaviour shifts (new workload mix, firmware, cooling), its frozen
autoencoder keeps reconstructing the old normal and every row looks anomalous. Instead of
retraining, hpcad keeps the model fixed and fits one linear map that reads the model's latent
code ``c`` and its reconstruction ``r`` of each standardised row ``x``::

    r' = r + [r, c, 1] @ D        D: [M + C + 1, M]

``D`` solves a ridge regression of the residual ``x - r`` on ``[r, c, 1]`` over a few new normal
rows (as little as one day): a convex problem with a closed-form solution, penalised towards
``D = 0`` (the old model unchanged) with strength ``ridge x rows``, the bias left free. A level
shift becomes the bias, a changed gain or mix becomes the linear part; it fits in milliseconds
and, being linear and ridge-penalised, cannot overfit the few samples the way retraining the
network would.

Maps belong to the nightly job that fits them, not to the training run (which stays as trained:
another account may own it, and two nightly outputs may share it): ``<nightly.out>/light/<node>/
v<N>-from-<YYYY-MM-DD>.pt``, a version per refit and the first night it may score. Maps an older
hpcad wrote beside the models (``models/<node>.light-v<N>.pt``) are still read, never written.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hpcad.errors import ConfigError
from hpcad.model.autoencoder import ensemble_recon, stack
from hpcad.model.files import LIGHT_NAME, load_tensors, model_digest, model_path, save_tensors

log = logging.getLogger(__name__)

FORMAT = "hpcad-light-map"


@dataclass
class LightMap:
    delta: torch.Tensor  # [M + C + 1, M]
    version: int = 1
    rows: int = 0
    ridge: float = 1.0
    fitted_on: list[str] = field(default_factory=list)  # the days (or sources) of the rows
    created: str = ""
    valid_from: str = ""  # first night (YYYY-MM-DD) the map may score; "" = any
    model: str = ""  # digest of the model file it was fitted for (model_digest); "" = not recorded

    def apply(self, recon: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Adapted reconstruction for rows [..., M] with codes [..., C]."""
        d = self.delta.to(recon.device, recon.dtype)
        return recon + recon @ d[: recon.shape[-1]] + code @ d[recon.shape[-1]:-1] + d[-1]

    def save(self, path: Path) -> None:
        obj = {"format": FORMAT, "delta": self.delta.contiguous(), "version": self.version, "rows": self.rows,
               "ridge": self.ridge, "fitted_on": list(self.fitted_on), "created": self.created,
               "valid_from": self.valid_from, "model": self.model}
        save_tensors(path, obj)

    @classmethod
    def load(cls, path: Path) -> "LightMap":
        obj = load_tensors(path, FORMAT, "light map")
        return cls(obj["delta"], int(obj["version"]), int(obj["rows"]), float(obj["ridge"]),
                   list(obj["fitted_on"]), str(obj["created"]), str(obj.get("valid_from", "")),
                   str(obj.get("model", "")))


LIGHT_FOLDER = "light"  # <nightly.out>/light: the nightly job's maps, one folder per node
VERSION_NAME = re.compile(r"^v(\d+)-from-(\d{4}-\d{2}-\d{2}|any)\.pt$")


def version_path(folder: Path, node: str, lm: LightMap) -> Path:
    """Where ``lm`` is kept: its version and the first night it may score are in the name, so a night
    picks its map without opening the others."""
    return Path(folder) / node / f"v{lm.version}-from-{lm.valid_from or 'any'}.pt"


class LightMaps:
    """The light maps of the node models in ``models_dir`` that one scoring or one nightly job reads:
    those in ``folder`` (written by :meth:`save`) and, read only, those an older hpcad wrote beside
    the models. A map fitted for another model file of the node (the nightly job pointed at a new
    training run, a node retrained) is not applied."""

    def __init__(self, folder: Path | None, models_dir: Path | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self._legacy: dict[str, list[tuple[int, Path]]] | None = None
        self._said = False
        self._digests: dict[str, str] = {}

    def _versions(self, node: str) -> list[tuple[int, str, Path]]:
        """(version, valid_from, path) of the node's maps in ``folder``; "" = any night."""
        d = self.folder / node if self.folder is not None else None
        if d is None or not d.is_dir():
            return []
        return [(int(m.group(1)), "" if m.group(2) == "any" else m.group(2), d / m.group(0))
                for e in os.scandir(d) if (m := VERSION_NAME.match(e.name))]

    def _legacy_versions(self, node: str) -> list[tuple[int, Path]]:
        """models/<node>.light-v<N>.pt: the folder listed once, whatever the number of nodes."""
        if self._legacy is None:
            self._legacy = {}
            if self.models_dir is not None and self.models_dir.is_dir():
                for e in os.scandir(self.models_dir):
                    if (m := LIGHT_NAME.search(e.name)) and m.group(1):
                        self._legacy.setdefault(e.name[:m.start()], []).append((int(m.group(1)), Path(e.path)))
        return self._legacy.get(node, [])

    def next_version(self, node: str, valid_from: str) -> int:
        """The version a refit valid from ``valid_from`` takes: that of the node's map valid from the
        same night (a rerun of the night replaces it, so a rerun leaves the same files), else one
        more than the highest the node has."""
        mine = self._versions(node)
        same = [v for v, night, _ in mine if night == valid_from]
        if same:
            return max(same)
        return 1 + max([v for v, _, _ in mine] + [v for v, _ in self._legacy_versions(node)], default=0)

    def for_night(self, node: str, night: str | None = None) -> LightMap | None:
        """The map that scores ``night`` (YYYY-MM-DD; None: any night, the newest): of the maps valid
        by then, the one valid from the latest night, the highest version of those. So a rerun of an
        old night reproduces its alarms, and the map it refits (valid from the night after) replaces
        only the map of that night, not those fitted on later nights."""
        mine = [x for x in self._versions(node) if night is None or x[1] <= night]
        if mine:
            lm = LightMap.load(max(mine, key=lambda x: (x[1], x[0]))[2])
            return lm if self._fits(node, lm) else None
        for _, p in sorted(self._legacy_versions(node), reverse=True):  # newest first: their nights are inside
            lm = LightMap.load(p)
            if night is None or lm.valid_from <= night:
                return lm
        return None

    def digest(self, node: str) -> str:
        """The node's model file's digest (recorded in the maps fitted for it), read once."""
        if node not in self._digests:
            self._digests[node] = model_digest(model_path(self.models_dir, node))
        return self._digests[node]

    def _fits(self, node: str, lm: LightMap) -> bool:
        if not lm.model or self.models_dir is None or lm.model == self.digest(node):
            return True
        if not self._said:
            log.warning("light maps fitted for other model files are not applied (first: node %s's version %d, "
                        "not fitted for %s: a new training run, or the node retrained); the nodes score "
                        "without one until a refit (said once)", node, lm.version, model_path(self.models_dir, node))
            self._said = True
        return False

    def save(self, node: str, lm: LightMap, into: Path | None = None) -> Path:
        """``lm`` into ``folder``, or into ``into`` (a night's staging folder, :func:`publish_staged`)."""
        path = version_path(self.folder if into is None else into, node, lm)
        path.parent.mkdir(parents=True, exist_ok=True)
        lm.save(path)
        return path


STAGED = ".light-new"  # in a night's scratch folder: the maps it fitted, until the night is published


def publish_staged(staged: Path, folder: Path) -> int:
    """Move the maps a night fitted (``staged``, on the same file system) into the job's light
    folder, each by rename; a night that fails before this changes no map. Returns how many."""
    moved = 0
    for p in sorted(Path(staged).glob("*/*.pt")):
        dest = Path(folder) / p.parent.name / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, dest)
        moved += 1
    shutil.rmtree(staged, ignore_errors=True)
    return moved


def scoring_maps(score_cfg, models_dir: Path) -> LightMaps:
    """The maps ``score.light_maps`` names (and any an older hpcad wrote beside the models), checked."""
    check_light_options(score_cfg, paths=True)
    return LightMaps(score_cfg.light_maps, models_dir)


def check_light_options(score_cfg, paths: bool = False) -> None:
    """``score.light_night`` is a night; with ``paths``, ``score.light_maps`` is a folder."""
    night, folder = score_cfg.light_night, score_cfg.light_maps
    if night is not None:
        try:
            ok = dt.date.fromisoformat(str(night)).isoformat() == str(night)
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"score.light_night={night!r}: a night as YYYY-MM-DD (the maps valid that night apply)")
    if paths and folder is not None and not Path(folder).is_dir():
        raise ConfigError(f"score.light_maps={folder}: not a folder (a nightly output's {LIGHT_FOLDER}/ folder)")


def recon_and_code(members: list[list[torch.Tensor]], n_encoder: int, x: np.ndarray,
                   n_out: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen model's reconstruction (its members' mean, of each input's last ``n_out`` values:
    the newest row of a window) and mean latent code of standardised inputs x [T, D]."""
    n_out = x.shape[1] if n_out is None else n_out
    with torch.no_grad():
        recon, code = ensemble_recon(stack(members, "cpu"),
                                     torch.from_numpy(np.ascontiguousarray(x))[None], n_encoder, len(members), n_out)
    return recon[0].double(), code[0].double()


def fit_light_map(members: list[list[torch.Tensor]], n_encoder: int, x: np.ndarray, ridge: float,
                  fitted_on: list[str], previous: LightMap | None = None, valid_from: str = "",
                  n_out: int | None = None) -> LightMap:
    """Closed-form ridge fit of the map on standardised normal inputs x [T, D] (T >= 1; a window's
    last ``n_out`` values are the row it scores)."""
    if len(x) == 0:
        raise ValueError("light retraining needs at least one normal row")
    n_out = x.shape[1] if n_out is None else n_out
    recon, code = recon_and_code(members, n_encoder, x, n_out)
    F = torch.cat([recon, code, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    R = torch.from_numpy(np.ascontiguousarray(x[:, x.shape[1] - n_out:])).double() - recon
    penalty = torch.full((F.shape[1],), float(ridge) * len(x), dtype=torch.float64)
    penalty[-1] = 1e-9 * len(x)  # the bias (a level shift) is not pulled towards zero
    delta = torch.linalg.solve(F.T @ F + torch.diag(penalty), F.T @ R)
    return LightMap(delta.float(), (previous.version + 1) if previous else 1, len(x), float(ridge), list(fitted_on),
                    dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), valid_from)
