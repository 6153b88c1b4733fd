"""A process mesh: the job's ranks arranged on named dimensions (e.g. ``pp × dp × ep``).

Rank order: the first dimension varies slowest and the last fastest (row-major), so with
``Mesh(world, pp=2, dp=2, ep=2)`` rank ``r`` sits at ``pp = r // 4``, ``dp = (r // 2) % 2``,
``ep = r % 2``. Put the dimension that talks most (expert all-to-all, later tensor
parallelism) last: its ranks are consecutive, which ``mpiexec`` places on one node. This
matches :class:`moecore.train.parallel.Layout`'s ``dp × ep`` order (ep consecutive ranks).
"""

from __future__ import annotations

import math

from moecore.distributed.group import Group

__all__ = ["Mesh"]


class Mesh:
    """Named dimensions over a group, each with its sub-group.

    Args:
        world: the job's group; its size must be the product of the dimensions.
        **dims: dimension name → size, slowest first (sizes ≥ 1).

    Every rank of ``world`` must build the mesh (it splits the group once per dimension,
    collectively, in the order given).

    Examples:
        >>> from moecore.distributed import SingleProcess
        >>> mesh = Mesh(SingleProcess(), pp=1, dp=1)
        >>> mesh.coord("pp"), mesh.group("dp").size
        (0, 1)
    """

    def __init__(self, world: Group, **dims: int) -> None:
        if not dims:
            raise ValueError("a mesh needs at least one dimension")
        for name, size in dims.items():
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"mesh dimension {name!r} must be an int >= 1, got {size!r}")
        if math.prod(dims.values()) != world.size:
            shape = " × ".join(f"{n}={s}" for n, s in dims.items())
            raise ValueError(
                f"the mesh {shape} has {math.prod(dims.values())} ranks, the job {world.size}"
            )
        self.world = world
        self.dims = dict(dims)
        self.coords = self.coords_of(world.rank)
        self._groups: dict[str, Group] = {}
        self._multi: dict[tuple[str, ...], Group] = {}
        for name in self.dims:
            # Ranks that agree on every other coordinate: same colour; ordered by this one.
            others = {n: c for n, c in self.coords.items() if n != name}
            color = self.rank_of(**others, **{name: 0})
            self._groups[name] = world.split(color, self.coords[name])

    @property
    def names(self) -> tuple[str, ...]:
        """The dimensions, slowest first."""
        return tuple(self.dims)

    def size(self, name: str) -> int:
        """Ranks along dimension ``name``."""
        return self.dims[self._check(name)]

    def coord(self, name: str) -> int:
        """This rank's position along ``name``."""
        return self.coords[self._check(name)]

    def group(self, name: str) -> Group:
        """The ranks that differ from this one only along ``name``; their rank in it is
        their coordinate along ``name``."""
        return self._groups[self._check(name)]

    def subgroup(self, *names: str) -> Group:
        """The ranks that differ from this one only along ``names`` (e.g. ``("dp", "ep")``:
        one pipeline stage's ranks), ordered as in the mesh. A collective over the world:
        every rank must ask for the same ``names`` in the same order. One name: as
        :meth:`group`."""
        for name in names:
            self._check(name)
        if len(names) == 1:
            return self._groups[names[0]]
        key = tuple(n for n in self.dims if n in names)
        if key not in self._multi:
            others = {n: (0 if n in key else c) for n, c in self.coords.items()}
            position = 0
            for n in key:
                position = position * self.dims[n] + self.coords[n]
            self._multi[key] = self.world.split(self.rank_of(**others), position)
        return self._multi[key]

    def coords_of(self, rank: int) -> dict[str, int]:
        """The coordinates of world rank ``rank``."""
        if not 0 <= rank < self.world.size:
            raise ValueError(f"rank {rank} is not in [0, {self.world.size})")
        out: dict[str, int] = {}
        for name, size in reversed(self.dims.items()):
            out[name] = rank % size
            rank //= size
        return {n: out[n] for n in self.dims}

    def rank_of(self, **coords: int) -> int:
        """The world rank at ``coords`` (every dimension given)."""
        if set(coords) != set(self.dims):
            raise ValueError(f"give a coordinate for each of {list(self.dims)}, got {coords}")
        rank = 0
        for name, size in self.dims.items():
            c = coords[name]
            if not 0 <= c < size:
                raise ValueError(f"coordinate {name}={c} is not in [0, {size})")
            rank = rank * size + c
        return rank

    def _check(self, name: str) -> str:
        if name not in self.dims:
            raise KeyError(f"the mesh has no dimension {name!r} (it has {list(self.dims)})")
        return name

    def __repr__(self) -> str:
        shape = ", ".join(f"{n}={s}" for n, s in self.dims.items())
        return f"Mesh({shape}; rank {self.world.rank} at {self.coords})"
