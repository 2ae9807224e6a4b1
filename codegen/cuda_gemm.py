"""The CUDA backend's GEMM: a register-tiled kernel through shared memory, printed into every
module (its tile shape chosen per target), and cuBLAS through CuPy as the alternative to measure
against it on a GPU."""

from __future__ import annotations

from dataclasses import dataclass

GEMM = '''
@cuda.jit
def gemm_{F}(a, b, c, m, n, k, ta, tb):
    """c = op(a) @ op(b): a block computes a {BM}x{BN} tile of c through shared memory, {BK} deep
    at a time; each of its {TX}x{TY} threads keeps {R}x{R} of the tile in registers, its rows and
    columns strided by the block's shape (neighbouring threads touch neighbouring addresses)."""
    sa = cuda.shared.array(({BK}, {BM}), {F})
    sb = cuda.shared.array(({BK}, {BN}), {F})
    acc = cuda.local.array(({R}, {R}), {F})
    ra = cuda.local.array({R}, {F})
    rb = cuda.local.array({R}, {F})
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    tid = ty * {TX} + tx
    row0, col0 = cuda.blockIdx.y * {BM}, cuda.blockIdx.x * {BN}
    for i in range({R}):
        for j in range({R}):
            acc[i, j] = {F}(0.0)
    for t in range(0, k, {BK}):
        for e in range(tid, {BK} * {BM}, {TX} * {TY}):  # op(a)[row0:+{BM}, t:+{BK}], read along memory
            q, r = (e // {BM}, e % {BM}) if ta else (e % {BK}, e // {BK})
            row, kk = row0 + r, t + q
            sa[q, r] = (a[kk, row] if ta else a[row, kk]) if row < m and kk < k else {F}(0.0)
        for e in range(tid, {BK} * {BN}, {TX} * {TY}):  # op(b)[t:+{BK}, col0:+{BN}]
            q, cc = (e % {BK}, e // {BK}) if tb else (e // {BN}, e % {BN})
            col, kk = col0 + cc, t + q
            sb[q, cc] = (b[col, kk] if tb else b[kk, col]) if col < n and kk < k else {F}(0.0)
        cuda.syncthreads()
        for q in range({BK}):
            for i in range({R}):
                ra[i] = sa[q, ty + i * {TY}]
            for j in range({R}):
                rb[j] = sb[q, tx + j * {TX}]
            for i in range({R}):
                for j in range({R}):
                    acc[i, j] += ra[i] * rb[j]
        cuda.syncthreads()
    for i in range({R}):
        row = row0 + ty + i * {TY}
        for j in range({R}):
            col = col0 + tx + j * {TX}
            if row < m and col < n:
                c[row, col] = acc[i, j]

'''


@dataclass(frozen=True)
class GemmTiles:
    """The register-tiled GEMM's shape: a block's tile of C (``tile`` square), the depth of K it
    stages in shared memory, and the square of C each thread holds in registers."""

    tile: int
    depth: int
    per_thread: int

    @property
    def threads(self) -> int:  # per side of the block
        return self.tile // self.per_thread

    def source(self, F: str) -> str:
        t = self.threads
        return GEMM.format(F=F, BM=self.tile, BN=self.tile, BK=self.depth, R=self.per_thread, TX=t, TY=t)


GPU_TILES = GemmTiles(tile=64, depth=16, per_thread=4)  # 256 threads, 8 KB of shared memory (f32)
SIM_TILES = GemmTiles(tile=8, depth=4, per_thread=2)  # 16 simulated threads a block: every path, few threads


class CublasGemm:
    """``gemm_f32[grid, block](a, b, c, m, n, k, ta, tb)`` done by cuBLAS through CuPy, zero-copy on
    Numba's device arrays and on the same (default) stream; chosen with GRADFUSE_CUDA_GEMM=cublas.
    Not yet run on a GPU (none was lent so far): the tiled GEMM stays the default until measured."""

    def __getitem__(self, launch):
        return self

    def __call__(self, a, b, c, m, n, k, ta, tb) -> None:
        import cupy

        x, y = cupy.asarray(a), cupy.asarray(b)
        cupy.matmul(x.T if ta else x, y.T if tb else y, out=cupy.asarray(c))
