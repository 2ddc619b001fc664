"""Semantic-ID quantizers: X (an LLM embedding) -> M discrete codes, one per level.

Three kinds implement one interface, `Quantizer`, and are registered by their `kind` in
`QUANTIZERS` (`index.kind` picks one). Adding a kind = one subclass, one registry line and its
name in `schema.INDEX_KINDS` (a test checks the two agree); `warmup` trains only the RQ-VAE (its
k-means and dead-code recipe), so a new kind that learns also needs its warm-up there:
- `RQVAE` (paper §4.2.2, eq. 10-11): MLP encoder -> residual quantizer with M codebooks
  of N vectors -> mirror MLP decoder reconstructing X. Trainable (warmup, and again
  during dynamic fine-tuning through `rq_loss`).
- `LSHQuantizer`: random-hyperplane LSH, log2(N) sign bits per level (TT-DLSH/TT-SLSH).
- `RandomQuantizer`: random codes keyed by entity id (TT-SR).

Inputs are standardised per dimension inside each quantizer (the `input_mean` /
`input_scale` buffers, fitted on the warmup embeddings and saved with the weights):
mean-pooled LLM states carry a few dimensions with very large values that would
otherwise dominate every distance. Fine-tuning gets the same normalisation for free
because it is part of the module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import TTDSError
from .io import save_tensors

def check_index_shape(length: int, codebook_size: int) -> None:
    if length < 1:
        raise TTDSError(f"params: 'index.length' = {length}, expected at least 1")
    if codebook_size < 2:
        raise TTDSError(f"params: 'index.codebook_size' = {codebook_size}, expected at least 2")


def default_widths(in_dim: int, code_dim: int) -> list[int]:
    """Encoder widths: in_dim, every power of two strictly between code_dim and in_dim
    (descending), then code_dim. 4096 -> [4096, 2048, 1024, 512, 256] as in the paper;
    SmolLM2's 576 -> [576, 512, 256]."""
    hidden = []
    p = 1 << max(in_dim - 1, 1).bit_length()
    while p > code_dim:
        if p < in_dim:
            hidden.append(p)
        p //= 2
    return [in_dim, *hidden, code_dim]


def mlp(widths: list[int]) -> nn.Sequential:
    """Linear layers through `widths`, ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def _as_tensor(x, like: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x.to(device=like.device, dtype=like.dtype)


def _check_dim(x: torch.Tensor, in_dim: int) -> None:
    if x.ndim != 2 or x.shape[1] != in_dim:
        raise TTDSError(f"embeddings of shape {tuple(x.shape)} do not match the quantizer's input dim {in_dim}")


class Quantizer(nn.Module):
    """What the pipeline needs of an index kind: `warmup` builds one per tower (and trains the
    RQ-VAE), `build_sids` reads its `codes`, fine-tuning ties the SID rows to its
    `codebook`s, adds its `rq_loss` (L_Token) and, at a refresh, re-fits its normalisation and
    re-derives codes with hysteresis (`sticky_codes`). The defaults are "nothing of that kind":
    no codebook vectors, no loss, no normalisation, no hysteresis. (`learns` decides whether
    fine-tuning trains it; warmup's training recipe is the RQ-VAE's.)"""

    kind: str = ""
    learns = False     # trained by warmup and, with a dynamic index, during fine-tuning
    in_dim: int
    length: int
    codebook_size: int

    def codes(self, x, ids=None) -> torch.Tensor:
        """LongTensor [B, M] of code indices of the rows of `x` (`ids`: the entities' ids)."""
        raise NotImplementedError

    def sticky_codes(self, x, previous, margin: float) -> torch.Tensor | None:
        """Codes that keep `previous` unless the new ones win by `margin`; None: no
        hysteresis for this kind (the refresh takes `codes`)."""
        return None

    def codebook(self, m: int) -> torch.Tensor | None:
        """Level m's code vectors [N, code_dim], or None when codes are not vectors."""
        return None

    def rq_loss(self, x) -> torch.Tensor | None:
        """The quantizer's own objective on `x` (L_Token), or None when it learns nothing."""
        return None

    def fit_normalisation(self, x, scale: bool = True) -> None:
        """Re-fit the input normalisation on `x` (a refresh does, on the re-embedded X)."""

    def config(self) -> dict:
        """The JSON config that rebuilds it with `build_quantizer` (weights come separately)."""
        return {"kind": self.kind, "in_dim": self.in_dim, "length": self.length, "codebook_size": self.codebook_size}

    @classmethod
    def from_config(cls, cfg: dict) -> "Quantizer":
        raise NotImplementedError


class _Standardise(Quantizer):
    """Per-dimension standardisation with stats stored as buffers (saved with the weights)."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_scale", torch.ones(in_dim))

    @torch.no_grad()
    def fit_normalisation(self, x, scale: bool = True) -> None:
        x = _as_tensor(x, self.input_mean)
        self.input_mean.copy_(x.mean(0))
        if scale:
            self.input_scale.copy_(x.std(0).clamp(min=1e-6))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.input_mean) / self.input_scale


class RQVAE(_Standardise):
    """Residual-quantization VAE (paper eq. 10-11, 13)."""

    kind = "rq"
    learns = True

    def __init__(self, in_dim: int, code_dim: int = 256, length: int = 4, codebook_size: int = 256,
                 widths: list[int] | None = None, beta: float = 0.25):
        super().__init__(in_dim)
        check_index_shape(length, codebook_size)
        widths = list(widths) if widths else default_widths(in_dim, code_dim)
        if widths[0] != in_dim or widths[-1] != code_dim:
            raise TTDSError(f"quantizer widths {widths} must start at the input dim {in_dim} "
                            f"and end at index.code_dim {code_dim}")
        self.in_dim, self.code_dim, self.length, self.codebook_size = in_dim, code_dim, length, codebook_size
        self.widths, self.beta = widths, beta
        self.encoder = mlp(widths)
        self.decoder = mlp(widths[::-1])
        # One tensor [M, N, code_dim]: level m's codebook is codebooks[m].
        self.codebooks = nn.Parameter(torch.randn(length, codebook_size, code_dim) / code_dim ** 0.5)

    def codebook(self, m: int) -> torch.Tensor:
        return self.codebooks[m]

    def config(self) -> dict:
        return {**super().config(), "code_dim": self.code_dim, "widths": self.widths, "beta": self.beta}

    @classmethod
    def from_config(cls, cfg: dict) -> "RQVAE":
        return cls(int(cfg["in_dim"]), code_dim=int(cfg.get("code_dim", 256)), length=int(cfg["length"]),
                   codebook_size=int(cfg["codebook_size"]), widths=cfg.get("widths"),
                   beta=float(cfg.get("beta", 0.25)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        _check_dim(x, self.in_dim)
        return self.encoder(self.normalise(x))

    @staticmethod
    def _nearest(r: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """Index of the closest codebook row to each row of r (squared L2, eq. 10)."""
        dist = (r.pow(2).sum(1, keepdim=True) - 2 * r @ codebook.T + codebook.pow(2).sum(1)[None])
        return dist.argmin(1)

    def quantize(self, z: torch.Tensor):
        """(z_q straight-through, codes [B, M], codebook loss, commitment loss, residual norms).

        Level m quantizes the residual r_m = r_{m-1} - c*_{m-1} (eq. 11). The codebook
        loss pulls c*_m towards r_m, the commitment loss pulls r_m (hence the encoder)
        towards c*_m; their sum over levels is eq. 13. `residual_norms[m]` is the mean
        norm of r_m (m = 0 is z itself, m = M what is left after all levels).
        """
        residual, z_q = z, torch.zeros_like(z)
        codes, norms = [], [z.detach().norm(dim=1).mean()]
        loss_codebook = z.new_zeros(())
        loss_commit = z.new_zeros(())
        for m in range(self.length):
            idx = self._nearest(residual.detach(), self.codebooks[m])
            c = self.codebooks[m][idx]
            loss_codebook = loss_codebook + F.mse_loss(c, residual.detach())
            loss_commit = loss_commit + F.mse_loss(residual, c.detach())
            z_q = z_q + c
            residual = residual - c.detach()
            codes.append(idx)
            norms.append(residual.detach().norm(dim=1).mean())
        z_q_st = z + (z_q - z).detach()
        return z_q_st, torch.stack(codes, 1), loss_codebook, loss_commit, norms

    def forward(self, x) -> dict:
        x = _as_tensor(x, self.input_mean)
        z = self.encode(x)
        z_q, codes, loss_codebook, loss_commit, norms = self.quantize(z)
        recon = self.decoder(z_q)
        loss_recon = F.mse_loss(recon, self.normalise(x))
        loss = loss_recon + loss_codebook + self.beta * loss_commit
        return {"recon": recon, "codes": codes, "z": z, "z_q": z_q, "loss": loss, "loss_recon": loss_recon,
                "loss_codebook": loss_codebook, "loss_commit": loss_commit, "residual_norms": norms}

    def rq_loss(self, x) -> torch.Tensor:
        """L_Token of eq. 13 (residual errors summed over levels) plus reconstruction:
        the quantizer's own objective, for fine-tuning to keep training it on new X."""
        return self.forward(x)["loss"]

    @torch.no_grad()
    def codes(self, x, ids=None, batch_size: int = 4096) -> torch.Tensor:
        """LongTensor [B, M] of code indices (`ids` unused; part of the shared API)."""
        x = _as_tensor(x, self.input_mean)
        _check_dim(x, self.in_dim)
        chunks = [self.quantize(self.encode(x[i:i + batch_size]))[1] for i in range(0, len(x), batch_size)]
        return torch.cat(chunks) if chunks else torch.zeros((0, self.length), dtype=torch.long)

    @torch.no_grad()
    def sticky_codes(self, x, previous, margin: float) -> torch.Tensor:
        """Codes [B, M] that keep each row's `previous` code at a level unless the nearest
        code is closer by more than the relative `margin` (hysteresis, index.refresh_margin).

        Level by level: with d(.) the squared distance of the residual to a code, the new
        code replaces the old one only when d(new) < (1 - margin) * d(old); the next
        level's residual follows the code kept. margin 0 is plain nearest-code
        quantisation. Deep levels of a residual quantiser encode fine, easily perturbed
        detail; without hysteresis a small move of the backbone re-labels most SIDs
        although the coarse codes barely move (README, "Dynamic index").
        """
        x = _as_tensor(x, self.input_mean)
        previous = _previous_codes(previous, margin, len(x), self.length, x.device)
        residual, out = self.encode(x), []
        for m in range(self.length):
            book = self.codebooks[m]
            dist = residual.pow(2).sum(1, keepdim=True) - 2 * residual @ book.T + book.pow(2).sum(1)[None]
            new = dist.argmin(1)
            old = previous[:, m]
            keep = dist.gather(1, new[:, None]).squeeze(1) >= (1.0 - margin) * dist.gather(1, old[:, None]).squeeze(1)
            pick = torch.where(keep, old, new)
            out.append(pick)
            residual = residual - book[pick]
        return torch.stack(out, 1)

    @torch.no_grad()
    def _residuals(self, x: torch.Tensor, batch_size: int = 4096):
        """Residual r_m of every row at every level, and its code: lists of M tensors."""
        z = torch.cat([self.encode(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
        residuals, codes = [], []
        for m in range(self.length):
            idx = torch.cat([self._nearest(z[i:i + batch_size], self.codebooks[m])
                             for i in range(0, len(z), batch_size)])
            residuals.append(z)
            codes.append(idx)
            z = z - self.codebooks[m][idx]
        return residuals, codes

    @torch.no_grad()
    def init_kmeans(self, x, sample: int = 20000, iters: int = 25, seed: int = 0) -> None:
        """Initialise each codebook by k-means on real residuals of that level.

        Uses a seeded random sample of up to `sample` rows of x (the whole data set when
        smaller), level by level: level m clusters the residuals left by levels < m
        under the codebooks just fitted. With fewer distinct points than codes, the
        spare codes are copies of data points plus small noise (dead codes that
        `reseed_dead_codes` can later move).
        """
        from sklearn.cluster import KMeans

        x = _as_tensor(x, self.input_mean)
        gen = np.random.default_rng(seed)
        if len(x) > sample:
            x = x[torch.as_tensor(np.sort(gen.choice(len(x), sample, replace=False)))]
        z = self.encode(x)
        for m in range(self.length):
            points = z.double().cpu().numpy()
            k = min(self.codebook_size, len(np.unique(points.round(6), axis=0)))
            km = KMeans(n_clusters=k, n_init=1, max_iter=iters, random_state=seed + m).fit(points)
            centers = torch.as_tensor(km.cluster_centers_, dtype=z.dtype)
            if k < self.codebook_size:
                extra = points[gen.choice(len(points), self.codebook_size - k)]
                noise = gen.normal(0.0, 1e-3, extra.shape)
                centers = torch.cat([centers, torch.as_tensor(extra + noise, dtype=z.dtype)])
            self.codebooks[m].copy_(centers.to(self.codebooks.device))
            z = z - self.codebooks[m][self._nearest(z, self.codebooks[m])]

    @torch.no_grad()
    def reseed_dead_codes(self, x, min_usage: int = 1, seed: int = 0) -> int:
        """Move codes used by fewer than `min_usage` rows of x onto random residuals of
        their level (paper-style RQ-VAEs lose many codes otherwise). Returns how many."""
        x = _as_tensor(x, self.input_mean)
        gen = torch.Generator().manual_seed(seed)
        moved = 0
        for m in range(self.length):
            residuals, codes = self._residuals(x)
            usage = torch.bincount(codes[m], minlength=self.codebook_size)
            dead = torch.nonzero(usage < min_usage).flatten()
            if len(dead) == 0:
                continue
            pick = torch.randint(len(x), (len(dead),), generator=gen)
            self.codebooks[m][dead] = residuals[m][pick.to(residuals[m].device)]
            moved += len(dead)
        return moved


def _previous_codes(previous, margin: float, rows: int, length: int, device) -> torch.Tensor:
    """The checked `previous` codes [rows, length] of a `sticky_codes` call."""
    if not 0.0 <= margin < 1.0:
        raise TTDSError(f"params: 'index.refresh_margin' = {margin!r}, expected 0 <= margin < 1")
    previous = torch.as_tensor(np.asarray(previous), dtype=torch.long, device=device)
    if previous.shape != (rows, length):
        raise TTDSError(f"previous codes of shape {tuple(previous.shape)}, expected ({rows}, {length})")
    return previous


def _is_power_of_two(n: int) -> bool:
    return n >= 2 and n & (n - 1) == 0


class LSHQuantizer(_Standardise):
    """Random-hyperplane LSH: level m's code is log2(N) sign bits of seeded Gaussian
    projections of the centred input, read as an integer. No trainable parameters."""

    kind = "lsh"

    def __init__(self, in_dim: int, length: int = 4, codebook_size: int = 256, seed: int = 0):
        super().__init__(in_dim)
        check_index_shape(length, codebook_size)
        if not _is_power_of_two(codebook_size):
            raise TTDSError(f"params: 'index.codebook_size' = {codebook_size}, LSH needs a power of two")
        self.in_dim, self.length, self.codebook_size = in_dim, length, codebook_size
        bits = codebook_size.bit_length() - 1
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("hyperplanes", torch.randn(length, bits, in_dim, generator=gen))
        self.register_buffer("weights", 2 ** torch.arange(bits))

    @classmethod
    def from_config(cls, cfg: dict) -> "LSHQuantizer":  # the hyperplanes are buffers: saved with it
        return cls(int(cfg["in_dim"]), length=int(cfg["length"]), codebook_size=int(cfg["codebook_size"]),
                   seed=int(cfg.get("seed", 0)))

    def _projections(self, x) -> torch.Tensor:
        x = _as_tensor(x, self.input_mean)
        _check_dim(x, self.in_dim)
        return torch.einsum("bd,mkd->bmk", self.normalise(x), self.hyperplanes)

    @torch.no_grad()
    def codes(self, x, ids=None) -> torch.Tensor:
        return ((self._projections(x) > 0).long() * self.weights).sum(-1)

    @torch.no_grad()
    def sticky_codes(self, x, previous, margin: float) -> torch.Tensor:
        """Codes [B, M] that keep each `previous` sign bit unless its projection now lies
        on the other side of the hyperplane by more than `margin` standard deviations of
        that projection over the rows (hysteresis, index.refresh_margin; margin 0 is plain
        hashing). The LSH counterpart of `RQVAE.sticky_codes`: without it a refresh on the
        fine-tuned backbone re-labels nearly every SID (TT-DLSH, README).
        """
        proj = self._projections(x)
        previous = _previous_codes(previous, margin, len(proj), self.length, proj.device)
        bits = proj > 0
        if margin > 0.0:
            old = (previous[:, :, None] & self.weights).ne(0)
            band = margin * proj.std(0, keepdim=True) if len(proj) > 1 else torch.zeros_like(proj[:1])
            bits = torch.where(proj.abs() > band, bits, old)
        return (bits.long() * self.weights).sum(-1)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash (SplitMix64 finaliser), vectorised."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class RandomQuantizer(Quantizer):
    """Random codes keyed by entity id: code[e, m] = hash(seed, e, m) mod N.

    The codes ignore the embedding entirely (the TT-SR ablation), so `codes` needs the
    entity ids; an entity keeps its code however often the index is refreshed.
    """

    kind = "random"

    def __init__(self, in_dim: int, length: int = 4, codebook_size: int = 256, seed: int = 0):
        super().__init__()
        check_index_shape(length, codebook_size)
        self.in_dim, self.length, self.codebook_size, self.seed = in_dim, length, codebook_size, seed

    def config(self) -> dict:
        return {**super().config(), "seed": self.seed}

    @classmethod
    def from_config(cls, cfg: dict) -> "RandomQuantizer":
        return cls(int(cfg["in_dim"]), length=int(cfg["length"]), codebook_size=int(cfg["codebook_size"]),
                   seed=int(cfg.get("seed", 0)))

    @torch.no_grad()
    def codes(self, x=None, ids=None) -> torch.Tensor:
        if ids is None:
            raise TTDSError("index.kind 'random' assigns codes by entity id: pass ids to codes()")
        if x is not None:
            _check_dim(torch.as_tensor(x), self.in_dim)
        ids = np.asarray(ids, dtype=np.uint64)
        levels = np.arange(self.length, dtype=np.uint64)
        with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
            key = _splitmix64(np.uint64(self.seed)) ^ _splitmix64(ids)
            h = _splitmix64(key[:, None] * np.uint64(self.length + 1) + levels[None])
        return torch.as_tensor((h % np.uint64(self.codebook_size)).astype(np.int64))


QUANTIZERS: dict[str, type[Quantizer]] = {"rq": RQVAE, "lsh": LSHQuantizer, "random": RandomQuantizer}
KINDS = tuple(QUANTIZERS)


def build_quantizer(cfg: dict) -> Quantizer:
    """A quantizer from its config: kind, in_dim, length, codebook_size (+ the kind's own keys)."""
    kind = cfg.get("kind", "rq")
    if kind not in QUANTIZERS:
        raise TTDSError(f"params: 'index.kind' = {kind!r}, expected one of {', '.join(KINDS)}")
    check_index_shape(int(cfg["length"]), int(cfg["codebook_size"]))
    return QUANTIZERS[kind].from_config(cfg)


def quantizer_config(q: Quantizer, **extra) -> dict:
    """The JSON config that rebuilds `q` with `build_quantizer`."""
    return {**q.config(), **extra}


def save_quantizer(path: str | Path, q, cfg: dict | None = None) -> None:
    """Weights and buffers as safetensors, the config in the file's metadata."""
    cfg = {**quantizer_config(q), **(cfg or {})}
    state = q.state_dict()
    if not state:  # safetensors needs at least one tensor
        state = {"_empty": torch.zeros(0)}
    save_tensors(path, state, metadata={"config": json.dumps(cfg)})


def load_quantizer(path: str | Path, in_dim: int | None = None):
    """(quantizer in eval mode, config). `in_dim`: the embeddings' dim, checked against it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TTDSError(f"{path}: quantizer checkpoint not found (run the warmup stage first)")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        state = {k: fh.get_tensor(k) for k in fh.keys() if k != "_empty"}
    if "config" not in meta:
        raise TTDSError(f"{path}: no quantizer config in the checkpoint metadata")
    cfg = json.loads(meta["config"])
    if in_dim is not None and int(cfg["in_dim"]) != int(in_dim):
        raise TTDSError(f"{path}: quantizer was trained on {cfg['in_dim']}-dim embeddings, "
                        f"the embeddings have dim {in_dim}")
    q = build_quantizer(cfg)
    q.load_state_dict(state)
    return q.eval(), cfg
