"""Fast kernels: the Bradley-Terry loss sum_m pw_m softplus(-x_m^T V wu_m / scale) and its gradients in one
fused pass over the pairs X [M, F] (numba, CPU; float32, and bf16 read as its bits), the per-user BT fits and
margins, and the thin products X [M, F] @ V [F, K] with float32 accumulation (matmul_f32, thin_matmul).

numba is optional: without it (or on a GPU) bt_loss runs as two thin PyTorch products. Callers test
`kernels.numba is not None` at call time, so setting it to None (a test's monkeypatch) selects the fallbacks.
Imports no other module of lorelib (so that a test can load this file under another module name).
"""
import contextlib
import inspect
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf

try:  # optional: fused one-pass CPU kernels
    import numba
except ImportError:
    numba = None


def matmul_f32(X, V, block_floats=2**22):
    """X [n, F] @ V [F, K] -> [n, K] with float32 accumulation, V kept in float32: a half-precision X (bf16 pairs or
    embeddings) is widened a block of about block_floats values at a time, never all at once."""
    if X.dtype in (torch.float32, torch.float64):
        return X @ V.to(X.device, X.dtype)
    V = V.to(X.device, torch.float32)
    block = max(1, block_floats // max(1, X.shape[1]))
    if V.requires_grad and torch.is_grad_enabled():
        return torch.cat([X[i:i + block].float() @ V for i in range(0, len(X), block)] or [X[:0].float() @ V])
    out = torch.empty(len(X), V.shape[1], device=X.device)
    buf = torch.empty(min(block, len(X)), X.shape[1], device=X.device)  # one float32 block, reused: no heap growth
    for i in range(0, len(X), block):
        n = min(block, len(X) - i)
        buf[:n].copy_(X[i:i + n])
        torch.mm(buf[:n], V, out=out[i:i + n])
    return out


class ThinMatmul(torch.autograd.Function):
    """X [M, F] @ V [F, K] for a tall X and a thin V; X gets no gradient.

    On CPU (MKL) both products are memory-bound, and the layout matters: the forward reads V
    column-major (2-3x faster than row-major), and dV = (G^T X)^T is accumulated over blocks
    of rows (autograd's X^T G is ~12x slower)."""

    @staticmethod
    def forward(ctx, X, V):
        ctx.save_for_backward(X)
        if X.dtype != torch.float32:  # bf16 pairs: float32 accumulation, a block of rows widened at a time
            return matmul_f32(X, V)
        if X.is_cuda:
            return X @ V
        return X @ V.t().contiguous().t()

    @staticmethod
    def backward(ctx, G):
        (X,) = ctx.saved_tensors
        if X.is_cuda and X.dtype == torch.float32:
            return None, (G.t() @ X).t()
        Gt = G.t().contiguous().float()  # [K, M]
        dV = torch.zeros(G.shape[1], X.shape[1], dtype=torch.float32, device=X.device)
        block = max(256, 2**20 // X.shape[1])  # rows per block: about 1M floats of X
        buf = None if X.dtype == torch.float32 else torch.empty(min(block, len(X)), X.shape[1], device=X.device)
        for i in range(0, X.shape[0], block):
            x = X[i:i + block] if buf is None else buf[:min(block, len(X) - i)].copy_(X[i:i + block])
            dV.addmm_(Gt[:, i:i + block], x)
        return None, dV.t()


class _Kernel:
    """A numba kernel, called like the function it compiles.

    Its on-disk cache is used only when its module is imported under its own name (the module's dotted name ends
    its file path, e.g. `lorelib.kernels` for .../lorelib/kernels.py): numba's cache refers to the module by name,
    so an entry written under another name (a file loaded with importlib) would break every later import. When
    loading or writing the cache fails at a call (a broken or foreign cache file, an unwritable folder), it is
    compiled again without the cache. PyTorch's thread count is put back after every call: numba's OpenMP layer
    sets it process-wide, and every later PyTorch op would run with more threads than asked for."""

    def __init__(self, py_func, parallel):
        self.py_func, self.options = py_func, dict(parallel=parallel, fastmath=True)
        self.dispatcher = None
        name = py_func.__module__.split(".")
        if Path(inspect.getfile(py_func)).with_suffix("").parts[-len(name):] == tuple(name):
            with contextlib.suppress(Exception):  # e.g. no writable cache location
                self.dispatcher = numba.njit(cache=True, **self.options)(py_func)
        if self.dispatcher is None:
            self.dispatcher = numba.njit(**self.options)(py_func)

    def __call__(self, *args):
        threads = torch.get_num_threads()
        try:
            return self.dispatcher(*args)
        except Exception:
            if isinstance(self.dispatcher._cache, numba.core.caching.NullCache):  # no cache: a real error
                raise
            self.dispatcher = numba.njit(**self.options)(self.py_func)
            return self.dispatcher(*args)
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)


def cpu_kernel(py_func=None, *, parallel=True):
    """Decorator: compile a function with numba (fastmath; numba.prange loops in parallel) -> a _Kernel.
    Use it under `if numba is not None:`."""
    if py_func is None:  # @cpu_kernel(parallel=False)
        return lambda f: _Kernel(f, parallel)
    return _Kernel(py_func, parallel)


if numba is not None:
    @numba.njit(inline="always", fastmath=True)
    def _softplus_and_grad(z, pw, scale):
        """(pw softplus(-z), d/dz' of it for z = z' / scale: -pw sigmoid(-z) / scale), stable for any z."""
        e = np.exp(-abs(z))
        sig = e / (1.0 + e) if z > 0 else 1.0 / (1.0 + e)
        return pw * (np.log1p(e) + max(-z, 0.0)), -sig * pw / scale


    @cpu_kernel
    def bt_loss_kernel(X, Vt, Wu, pw, scale):
        """One pass over X [M, F]: loss = sum_m pw_m softplus(-z_m), z_m = x_m^T V wu_m / scale,
        with dL/dV^T [K, F] and XV [M, K], g [M] (dL/dXV_m = g_m wu_m). Vt [K, F], Wu [M, K]."""
        M, F = X.shape
        K = Vt.shape[0]
        nblocks = 16  # fixed, so that the sums do not depend on the number of threads
        dVs = np.zeros((nblocks, K, F), np.float32)
        losses = np.zeros(nblocks)
        XV = np.empty((M, K), np.float32)
        g = np.empty(M, np.float32)
        for b in numba.prange(nblocks):
            for m in range(b * M // nblocks, (b + 1) * M // nblocks):
                z = 0.0
                for k in range(K):
                    s = np.float32(0.0)
                    for f in range(F):
                        s += X[m, f] * Vt[k, f]
                    XV[m, k] = s
                    z += s * Wu[m, k]
                loss, g[m] = _softplus_and_grad(z / scale, pw[m], scale)
                losses[b] += loss
                for k in range(K):
                    gk = np.float32(g[m] * Wu[m, k])
                    for f in range(F):
                        dVs[b, k, f] += gk * X[m, f]
        dVt = np.zeros((K, F), np.float32)
        for b in range(nblocks):
            dVt += dVs[b]
        return losses.sum(), dVt, XV, g


# The bf16 kernel: numba has no bfloat16 type, so a bf16 X is read as its uint16 bits and each value widened exactly
# (bits << 16 is the float32 of the same value) in registers as it is loaded. Rows go in groups of 4 against 3
# columns of V at a time (register blocking), over tiles of 512 columns that prefetch their share of the group two
# ahead (a plain numba loop reads memory far below the bandwidth). The 16 blocks are summed in order at the end:
# the same outputs for any number of threads.
if numba is not None:
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    _ROWS, _TILE, _AHEAD = 4, 512, 2  # rows per group, columns per tile, groups prefetched ahead

    @intrinsic
    def _f32_from_bits(typingctx, u):
        """uint32 -> float32 with the same bits (an LLVM bitcast)."""
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], context.get_value_type(types.float32))
        return types.float32(types.uint32), codegen


    @intrinsic
    def _prefetch(typingctx, addr):
        """Prefetch the cache line at byte address `addr` (intp) into all cache levels (llvm.prefetch: read,
        locality 3, data). A hint: it never faults."""
        def codegen(context, builder, sig, args):
            i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                                "llvm.prefetch.p0")
            builder.call(fn, [builder.inttoptr(args[0], i8p), ir.Constant(i32, 0), ir.Constant(i32, 3),
                              ir.Constant(i32, 1)])
            return context.get_dummy_value()
        return types.void(types.intp), codegen


    @numba.njit(inline="always")
    def _widen(h):
        """bfloat16 bits (uint16) -> float32, exactly."""
        return _f32_from_bits(np.uint32(h) << np.uint32(16))


    @numba.njit(inline="always")
    def _prefetch_range(addr, nbytes):
        for o in range(0, nbytes, 64):
            _prefetch(addr + o)


    # The inner loops: 4 rows x c columns of V (c = 3, 2, 1), all accumulators in registers. x* are bf16 rows
    # (uint16 [T]), v*/d* float32 [T] (a tile of V^T's and dV^T's rows), g_rk = g_r wu_rk.

    @numba.njit(inline="always", fastmath=True)
    def _dot4x3(x0, x1, x2, x3, v0, v1, v2):
        """-> the 12 dot products x_r . v_k, r-major."""
        a00 = a01 = a02 = a10 = a11 = a12 = a20 = a21 = a22 = a30 = a31 = a32 = np.float32(0.0)
        for j in range(v0.shape[0]):
            w0, w1, w2 = v0[j], v1[j], v2[j]
            y = _widen(x0[j])
            a00 += y * w0
            a01 += y * w1
            a02 += y * w2
            y = _widen(x1[j])
            a10 += y * w0
            a11 += y * w1
            a12 += y * w2
            y = _widen(x2[j])
            a20 += y * w0
            a21 += y * w1
            a22 += y * w2
            y = _widen(x3[j])
            a30 += y * w0
            a31 += y * w1
            a32 += y * w2
        return a00, a01, a02, a10, a11, a12, a20, a21, a22, a30, a31, a32


    @numba.njit(inline="always", fastmath=True)
    def _dot4x2(x0, x1, x2, x3, v0, v1):
        a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = np.float32(0.0)
        for j in range(v0.shape[0]):
            w0, w1 = v0[j], v1[j]
            y = _widen(x0[j])
            a00 += y * w0
            a01 += y * w1
            y = _widen(x1[j])
            a10 += y * w0
            a11 += y * w1
            y = _widen(x2[j])
            a20 += y * w0
            a21 += y * w1
            y = _widen(x3[j])
            a30 += y * w0
            a31 += y * w1
        return a00, a01, a10, a11, a20, a21, a30, a31


    @numba.njit(inline="always", fastmath=True)
    def _dot4x1(x0, x1, x2, x3, v0):
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for j in range(v0.shape[0]):
            w0 = v0[j]
            a0 += _widen(x0[j]) * w0
            a1 += _widen(x1[j]) * w0
            a2 += _widen(x2[j]) * w0
            a3 += _widen(x3[j]) * w0
        return a0, a1, a2, a3


    @numba.njit(inline="always", fastmath=True)
    def _axpy4x3(d0, d1, d2, x0, x1, x2, x3, g00, g01, g02, g10, g11, g12, g20, g21, g22, g30, g31, g32):
        """d_k += sum_r g_rk x_r, k < 3."""
        for j in range(d0.shape[0]):
            y0, y1, y2, y3 = _widen(x0[j]), _widen(x1[j]), _widen(x2[j]), _widen(x3[j])
            d0[j] += g00 * y0 + g10 * y1 + g20 * y2 + g30 * y3
            d1[j] += g01 * y0 + g11 * y1 + g21 * y2 + g31 * y3
            d2[j] += g02 * y0 + g12 * y1 + g22 * y2 + g32 * y3


    @numba.njit(inline="always", fastmath=True)
    def _axpy4x2(d0, d1, x0, x1, x2, x3, g00, g01, g10, g11, g20, g21, g30, g31):
        for j in range(d0.shape[0]):
            y0, y1, y2, y3 = _widen(x0[j]), _widen(x1[j]), _widen(x2[j]), _widen(x3[j])
            d0[j] += g00 * y0 + g10 * y1 + g20 * y2 + g30 * y3
            d1[j] += g01 * y0 + g11 * y1 + g21 * y2 + g31 * y3


    @numba.njit(inline="always", fastmath=True)
    def _axpy4x1(d0, x0, x1, x2, x3, g0, g1, g2, g3):
        for j in range(d0.shape[0]):
            d0[j] += g0 * _widen(x0[j]) + g1 * _widen(x1[j]) + g2 * _widen(x2[j]) + g3 * _widen(x3[j])


    @cpu_kernel
    def bt_loss_kernel_bf16(Xu16, Vt, Wu, pw, scale):
        """bt_loss_kernel for a bf16 X given as its bits Xu16 [M, F] (uint16): one pass over X -> loss =
        sum_m pw_m softplus(-z_m), z_m = x_m^T V wu_m / scale, with dL/dV^T [K, F], XV [M, K] and g [M]
        (dL/dXV_m = g_m wu_m). Vt [K, F], Wu [M, K] float32, pw [M]. All products accumulate in float32."""
        M, F = Xu16.shape
        K = Vt.shape[0]
        nblocks = 16  # fixed, so that the sums do not depend on the number of threads
        # np.empty, not np.zeros, and plain loops outside the prange: in a parallel function np.zeros and array
        # expressions are parallel regions too, each with a barrier, and on a loaded machine every barrier can
        # wait a scheduler time slice (the float32 kernel's 16 `dVt += dVs[b]` cost ~100 ms there).
        dVs = np.empty((nblocks, K, F), np.float32)
        losses = np.empty(nblocks)
        XV = np.empty((M, K), np.float32)
        g = np.empty(M, np.float32)
        zero = np.empty((1, F), np.uint16)  # stands in for the missing rows of a block's last group
        for f in range(F):
            zero[0, f] = 0
        base = Xu16.ctypes.data
        ntiles = 2 * ((F + _TILE - 1) // _TILE)  # per group: both passes
        tile_bytes = (_ROWS * 2 * F + ntiles - 1) // ntiles  # prefetched per tile: a group's rows are contiguous
        for b in numba.prange(nblocks):
            dV = dVs[b]
            dV[:] = 0.0
            losses[b] = 0.0
            s = np.zeros((_ROWS, K), np.float32)  # the group's x_r . v_k
            gw = np.zeros((_ROWS, K), np.float32)  # g_r wu_rk
            lo, hi = b * M // nblocks, (b + 1) * M // nblocks
            for m0 in range(lo, hi, _ROWS):
                n = min(_ROWS, hi - m0)
                x0 = Xu16[m0]
                x1 = Xu16[m0 + 1] if n > 1 else zero[0]
                x2 = Xu16[m0 + 2] if n > 2 else zero[0]
                x3 = Xu16[m0 + 3] if n > 3 else zero[0]
                ahead = min(m0 + _AHEAD * _ROWS, M)  # the group prefetched while this one is worked on
                pf, pf_end = base + 2 * F * ahead, base + 2 * F * min(ahead + _ROWS, M)
                s[:] = 0.0
                for t0 in range(0, F, _TILE):  # (1) the dot products x_r . v_k
                    t1 = min(t0 + _TILE, F)
                    _prefetch_range(pf, min(tile_bytes, pf_end - pf))
                    pf += tile_bytes
                    y0, y1, y2, y3 = x0[t0:t1], x1[t0:t1], x2[t0:t1], x3[t0:t1]
                    k = 0
                    while k < K:
                        if K - k >= 3:
                            a = _dot4x3(y0, y1, y2, y3, Vt[k, t0:t1], Vt[k + 1, t0:t1], Vt[k + 2, t0:t1])
                            for r in range(_ROWS):
                                s[r, k] += a[3 * r]
                                s[r, k + 1] += a[3 * r + 1]
                                s[r, k + 2] += a[3 * r + 2]
                            k += 3
                        elif K - k == 2:
                            c = _dot4x2(y0, y1, y2, y3, Vt[k, t0:t1], Vt[k + 1, t0:t1])
                            for r in range(_ROWS):
                                s[r, k] += c[2 * r]
                                s[r, k + 1] += c[2 * r + 1]
                            k += 2
                        else:
                            e = _dot4x1(y0, y1, y2, y3, Vt[k, t0:t1])
                            for r in range(_ROWS):
                                s[r, k] += e[r]
                            k += 1
                for r in range(_ROWS):  # (2) the loss and g of the group's rows, as in bt_loss_kernel
                    gw[r, :] = 0.0
                    if r >= n:
                        continue
                    m = m0 + r
                    z = 0.0
                    for k in range(K):
                        XV[m, k] = s[r, k]
                        z += s[r, k] * Wu[m, k]
                    loss, g[m] = _softplus_and_grad(z / scale, pw[m], scale)
                    losses[b] += loss
                    for k in range(K):
                        gw[r, k] = np.float32(g[m] * Wu[m, k])
                for t0 in range(0, F, _TILE):  # (3) dV_k += sum_r g_r wu_rk x_r
                    t1 = min(t0 + _TILE, F)
                    _prefetch_range(pf, min(tile_bytes, pf_end - pf))
                    pf += tile_bytes
                    y0, y1, y2, y3 = x0[t0:t1], x1[t0:t1], x2[t0:t1], x3[t0:t1]
                    k = 0
                    while k < K:
                        if K - k >= 3:
                            _axpy4x3(dV[k, t0:t1], dV[k + 1, t0:t1], dV[k + 2, t0:t1], y0, y1, y2, y3,
                                     gw[0, k], gw[0, k + 1], gw[0, k + 2], gw[1, k], gw[1, k + 1], gw[1, k + 2],
                                     gw[2, k], gw[2, k + 1], gw[2, k + 2], gw[3, k], gw[3, k + 1], gw[3, k + 2])
                            k += 3
                        elif K - k == 2:
                            _axpy4x2(dV[k, t0:t1], dV[k + 1, t0:t1], y0, y1, y2, y3,
                                     gw[0, k], gw[0, k + 1], gw[1, k], gw[1, k + 1],
                                     gw[2, k], gw[2, k + 1], gw[3, k], gw[3, k + 1])
                            k += 2
                        else:
                            _axpy4x1(dV[k, t0:t1], y0, y1, y2, y3, gw[0, k], gw[1, k], gw[2, k], gw[3, k])
                            k += 1
        dVt = np.empty((K, F), np.float32)
        loss = 0.0
        for b in range(nblocks):  # in order (losses.sum() would be a parallel reduction, its order the schedule's)
            loss += losses[b]
            for k in range(K):
                for f in range(F):
                    dVt[k, f] = dVs[b, k, f] if b == 0 else dVt[k, f] + dVs[b, k, f]
        return loss, dVt, XV, g


class _FusedBTLoss(torch.autograd.Function):
    """sum_m pw_m softplus(-x_m^T V wu_m / scale) and its gradients in one pass over X (CPU, numba); a bf16 X goes
    through bt_loss_kernel_bf16 (its bits as uint16), every product accumulated in float32."""

    @staticmethod
    def forward(ctx, X, V, Wu, pw, scale):
        kernel, Xn = ((bt_loss_kernel_bf16, X.view(torch.int16).numpy().view(np.uint16))
                      if X.dtype == torch.bfloat16 else (bt_loss_kernel, X.numpy()))
        loss, dVt, XV, g = kernel(Xn, V.detach().t().contiguous().numpy(), Wu.detach().contiguous().numpy(),
                                  pw.contiguous().numpy(), scale)
        XV, g = torch.from_numpy(XV), torch.from_numpy(g)
        ctx.save_for_backward(torch.from_numpy(dVt).t(), g[:, None] * XV)
        return torch.tensor(loss, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        dV, dWu = ctx.saved_tensors
        return None, grad * dV, grad * dWu, None, None


def bt_loss(X, V, Wu, pw, scale):
    """sum_m pw_m * softplus(-x_m^T V wu_m / scale) for X [M, F] (float32 or bf16), V [F, K], Wu [M, K], pw [M].

    On CPU with numba installed, one fused pass over X computes the loss and both gradients
    (the memory-bandwidth floor); otherwise forward and backward are two thin products."""
    if numba is not None and not X.is_cuda and X.dtype in (torch.float32, torch.bfloat16) and X.is_contiguous():
        return _FusedBTLoss.apply(X, V, Wu, pw, scale)
    z = (ThinMatmul.apply(X, V) * Wu).sum(1) / scale
    return (nnf.softplus(-z) * pw).sum()


if numba is not None:
    @cpu_kernel
    def per_user_bt_kernel(table, chosen, rejected, two_sided, order, starts, counts, iterations, lr, scale):
        """[c, F] per-user BT rewards: user u's pairs are rows order[starts[u]:starts[u] + counts[u]], with
        d = table[chosen] - table[rejected] (two_sided) or table[chosen]; full-batch Adam (PyTorch's update,
        betas 0.9, 0.999, eps 1e-8) on mean softplus(-d^T v / scale), from v = 0."""
        c, F = len(starts), table.shape[1]
        V = np.zeros((c, F), np.float32)
        for u in numba.prange(c):
            m = counts[u]
            D = np.empty((m, F), np.float32)
            for j in range(m):
                r = order[starts[u] + j]
                if two_sided:
                    D[j] = table[chosen[r]] - table[rejected[r]]
                else:
                    D[j] = table[chosen[r]]
            v = np.zeros(F, np.float32)
            m1 = np.zeros(F, np.float32)
            m2 = np.zeros(F, np.float32)
            g = np.empty(m, np.float32)
            grad = np.empty(F, np.float32)
            for t in range(1, iterations + 1):
                for j in range(m):
                    z = np.float32(0.0)
                    for f in range(F):
                        z += D[j, f] * v[f]
                    g[j] = -1.0 / (1.0 + np.exp(z / scale)) / (m * scale)  # -sigmoid(-z / scale) / (m scale)
                grad[:] = 0.0
                for j in range(m):
                    for f in range(F):
                        grad[f] += g[j] * D[j, f]
                step = lr / (1.0 - 0.9 ** t)
                root_bc2 = np.sqrt(1.0 - 0.999 ** t)
                for f in range(F):
                    m1[f] = 0.9 * m1[f] + 0.1 * grad[f]
                    m2[f] = 0.999 * m2[f] + 0.001 * grad[f] * grad[f]
                    v[f] -= step * m1[f] / (np.sqrt(m2[f]) / root_bc2 + 1e-8)
            V[u] = v
        return V

    @cpu_kernel
    def per_user_margins_kernel(table, chosen, rejected, user, V):
        """[M] (table[chosen] - table[rejected]) . V[user], one pass over the pairs."""
        M, F = len(user), table.shape[1]
        out = np.empty(M, np.float32)
        for j in numba.prange(M):
            c, r, u = chosen[j], rejected[j], user[j]
            s = np.float32(0.0)
            for f in range(F):
                s += (table[c, f] - table[r, f]) * V[u, f]
            out[j] = s
        return out

