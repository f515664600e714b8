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
network would. The map is saved beside the model (``models/<node>.light.pt``, with a version that
increments on every refit) and scoring applies it when present.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hpcad.model.autoencoder import ensemble_recon, stack
from hpcad.model.files import LIGHT_NAME, load_tensors, save_tensors

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

    def apply(self, recon: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Adapted reconstruction for rows [..., M] with codes [..., C]."""
        d = self.delta.to(recon.device, recon.dtype)
        return recon + recon @ d[: recon.shape[-1]] + code @ d[recon.shape[-1]:-1] + d[-1]

    def save(self, path: Path) -> None:
        obj = {"format": FORMAT, "delta": self.delta.contiguous(), "version": self.version, "rows": self.rows,
               "ridge": self.ridge, "fitted_on": list(self.fitted_on), "created": self.created,
               "valid_from": self.valid_from}
        save_tensors(path, obj)

    @classmethod
    def load(cls, path: Path) -> "LightMap":
        obj = load_tensors(path, FORMAT, "light map")
        return cls(obj["delta"], int(obj["version"]), int(obj["rows"]), float(obj["ridge"]),
                   list(obj["fitted_on"]), str(obj["created"]), str(obj.get("valid_from", "")))


def light_path(models_dir: Path, node: str, version: int | None = None) -> Path:
    """The node's current map, or one archived version (every version is kept)."""
    return Path(models_dir) / (f"{node}.light.pt" if version is None else f"{node}.light-v{version}.pt")


def save_version(models_dir: Path, node: str, lm: LightMap) -> None:
    lm.save(light_path(models_dir, node, lm.version))
    lm.save(light_path(models_dir, node))


def map_for_night(models_dir: Path, node: str, night: str) -> LightMap | None:
    """The newest map version allowed to score ``night`` (a rerun of an old night ignores maps
    fitted after it, so it reproduces that night's alarms). Versions are read newest first and the
    first allowed one is returned: a node refitted every night has hundreds of versions after a year."""
    versions = sorted(((int(m.group(1)), p) for p in Path(models_dir).glob(f"{node}.light-v*.pt")
                       if (m := LIGHT_NAME.search(p.name)) and m.group(1)), reverse=True)
    for _, p in versions:
        lm = LightMap.load(p)
        if lm.valid_from <= night:
            return lm
    return None


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
