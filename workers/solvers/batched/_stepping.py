"""Line-search methods as one evaluation round per engine step: every running member is always
inside a line search, and a member whose search ended is resolved, moved and given its next
direction without waiting for the others (no member waits for the slowest search)."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._result import Status
from ._linesearch import ArmijoSearch, BatchedStrongWolfe, WolfeSearch
from ._methods import BatchedProjectedLbfgs
from ._state import RUNNING, BatchState

if TYPE_CHECKING:
    from ._engine import BatchSolve

_LS = "ls."  # the line search's fields, kept in BatchState.memory (compacted, checkpointed)
_TRIAL = "trial."  # what the last trial evaluated, per row
SHRINK_BELOW = 0.5  # run the full line-search update on a gathered subset below this fraction


def _col(mask: Tensor) -> Tensor:
    return mask.unsqueeze(1)


class LineSearchStepper:
    """Drives bfgs, l-bfgs, l-bfgs-b, newton and gauss-newton, member by member as the single
    solver's LineSearchSolver.step does: direction (steepest descent when it is no descent
    direction), a search, one steepest-descent retry from a fresh first step, then accept or
    stop with LINE_SEARCH_FAILED / NON_FINITE."""

    def __init__(self, solve: BatchSolve) -> None:
        self.solve = solve
        self.rule = solve.rule
        self.wolfe = isinstance(self.rule, BatchedStrongWolfe)
        self.search_type = WolfeSearch if self.wolfe else ArmijoSearch
        self.method = solve.method
        self.name = solve.method_name
        self.projected = isinstance(self.method, BatchedProjectedLbfgs)

    # -- the line search state in memory -------------------------------------------------
    def _search(self, state: BatchState):
        mem = state.memory
        if _LS + "alpha" not in mem:
            return None
        return self.search_type(**{f.name: mem[_LS + f.name]
                                   for f in dataclasses.fields(self.search_type)})

    def _keep_search(self, state: BatchState, search) -> None:
        for f in dataclasses.fields(search):
            state.memory[_LS + f.name] = getattr(search, f.name)

    # -- evaluations at the trial points -------------------------------------------------
    def evaluate_trials(self, state: BatchState, searching: Tensor) -> None:
        """One batched evaluation at every row's trial point (rows not searching are
        evaluated too and ignored: a gather would cost more while most rows still run)."""
        solve, mem = self.solve, state.memory
        alpha, d = mem[_LS + "alpha"], mem[_LS + "d"]
        xt = torch.addcmul(state.x, alpha.unsqueeze(1), d)
        if self.projected:
            lower, upper = solve.bounds_rows(state)
            xt = torch.minimum(torch.maximum(xt, lower), upper)
        ids = state.index
        if self.name == "gauss-newton":
            r, J = solve.residual_jacobian(xt, ids)
            ft = 0.5 * (r * r).sum(1)
            gt = torch.bmm(J.transpose(1, 2), r.unsqueeze(2)).squeeze(2)
            mem[_TRIAL + "r"], mem[_TRIAL + "J"] = r, J
        else:
            ft, gt = solve.value_grad(xt, ids)
        if self.name == "newton":
            mem[_TRIAL + "H"] = solve.hessian(xt, ids)
        solve.evaluations += 1
        ft = torch.where(torch.isfinite(ft), ft, torch.full_like(ft, math.nan))
        der = (gt * d).sum(1)
        mem[_TRIAL + "x"], mem[_TRIAL + "f"], mem[_TRIAL + "g"] = xt, ft, gt
        counted = searching.long()
        state.nfev = state.nfev + counted
        if self.wolfe:
            state.njev = state.njev + counted
        search = self._search(state)
        # Most trials end their search at once; settle those cheaply and run the full update
        # on the rest. On the CPU a host sync costs nothing, so the rest is gathered when few;
        # on a GPU the update runs masked over every row (no sync).
        self.rule.settle(search, ft, der)
        if not solve.sync_free:
            rest = search.searching.nonzero().squeeze(1)
            if rest.numel() == 0:
                self._keep_search(state, search)
                return
            if rest.numel() < SHRINK_BELOW * search.alpha.shape[0]:
                part = _select_rows(search, rest)
                part = self.rule.advance(part, ft.index_select(0, rest),
                                         der.index_select(0, rest))
                self._keep_search(state, _scatter_rows(search, rest, part))
                return
        self._keep_search(state, self.rule.advance(search, ft, der))

    # -- between evaluations -------------------------------------------------------------
    def resolve_and_start(self, state: BatchState) -> None:
        """Members whose search ended are accepted (or retried, or stopped); every member
        still running then has a search under way. No host sync."""
        solve, mem = self.solve, state.memory
        running = state.status == RUNNING
        search = self._search(state)
        if search is None:
            solve.check_termination(state, running)
            self._start(state, state.status == RUNNING, retry=torch.zeros_like(running))
            return
        ended = running & ~search.searching
        ok = ended & search.success & (search.result_alpha > 0) & torch.isfinite(
            search.result_phi)
        if self.projected:
            ok = ok & ((mem[_TRIAL + "x"] - state.x).abs().amax(1) > 0)
            retry = ended & ~ok & (mem["count"] > 0)
        else:
            retry = ended & ~ok & ~mem[_LS + "steepest"]
        failed = ended & ~ok & ~retry
        state.status = torch.where(
            failed, torch.where(search.saw_nonfinite, int(Status.NON_FINITE),
                                int(Status.LINE_SEARCH_FAILED)), state.status)
        moved = self._accept(state, ok, search)
        solve.after_step(state, moved)
        solve.check_termination(state, moved)
        fresh = moved & (state.status == RUNNING)
        self._start(state, fresh | retry, retry=retry)

    def _accept(self, state: BatchState, ok: Tensor, search) -> Tensor:
        mem = state.memory
        x_new, f_new, g_new = mem[_TRIAL + "x"], mem[_TRIAL + "f"], mem[_TRIAL + "g"]
        if not self.wolfe:
            # The single solver asks for the gradient at an accepted Armijo point (and GN
            # for r and J there); they were evaluated with the trial: count them now.
            state.njev = state.njev + ok.long()
            bad = ok & ~torch.isfinite(g_new).all(1)
            if self.name == "gauss-newton":
                state.nfev = state.nfev + ok.long()
                state.njev = state.njev + ok.long()
                bad = bad | (ok & ~(torch.isfinite(mem[_TRIAL + "r"]).all(1)
                                    & torch.isfinite(mem[_TRIAL + "J"]).flatten(1).all(1)))
            state.status = torch.where(bad, int(Status.NON_FINITE), state.status)
            ok = ok & ~bad
        alpha, derphi0 = search.result_alpha, mem[_LS + "derphi0"]
        okc = _col(ok)
        s = torch.where(okc, x_new - state.x, 0.0)
        y = torch.where(okc, g_new - state.g, 0.0)
        if self.wolfe and not self.projected:
            sy = torch.where(ok, alpha * (search.result_derphi - derphi0), math.nan)
        else:
            sy = torch.full_like(state.f, math.nan)
        self.method.absorb(mem, ok, s, y, sy)
        state.step_norm = torch.where(ok, s.abs().amax(1), state.step_norm)
        state.f_prev = torch.where(ok, state.f, state.f_prev)
        state.x = torch.where(okc, x_new, state.x)
        state.f = torch.where(ok, f_new, state.f)
        state.g = torch.where(okc, g_new, state.g)
        state.step_size = torch.where(ok, alpha, state.step_size)
        state.nit = state.nit + ok.long()
        okm = ok.reshape(-1, 1, 1)
        if self.name == "gauss-newton":
            mem["r"] = torch.where(_col(ok), mem[_TRIAL + "r"], mem["r"])
            mem["J"] = torch.where(okm, mem[_TRIAL + "J"], mem["J"])
        if self.name == "newton":
            mem["H"] = torch.where(okm, mem[_TRIAL + "H"], mem["H"])
        return ok

    def _direction(self, state: BatchState, rows: Tensor):
        mem = state.memory
        if self.name == "newton":
            state.nhev = state.nhev + rows.long()
            H = mem["H"]
            bad = rows & ~torch.isfinite(H).flatten(1).all(1)
            state.status = torch.where(bad, int(Status.NON_FINITE), state.status)
            extra = torch.where(bad.reshape(-1, 1, 1), torch.zeros_like(H), H)
        elif self.name == "gauss-newton":
            extra = (mem["r"], mem["J"])
        elif self.projected:
            extra = self.solve.bounds_rows(state)
        else:
            extra = None
        return self.method.direction(state.x, state.g, mem, extra), extra

    def _start(self, state: BatchState, rows: Tensor, retry: Tensor) -> None:
        """New searches for `rows`: a fresh direction, or (for `retry` rows) steepest descent
        from a fresh first step after forgetting the curvature memory."""
        mem, g = state.memory, state.g
        self.method.reset(mem, retry)
        d, extra = self._direction(state, rows & ~retry)
        rows = rows & (state.status == RUNNING)
        derphi0 = (g * d).sum(1)
        descent = torch.isfinite(derphi0) & (derphi0 < 0)
        alpha_max = None
        if self.projected:
            lower, upper = extra
            again = rows & ~descent & (mem["count"] > 0)
            self.method.reset(mem, again)
            d = torch.where(_col(again), self.method.direction(state.x, g, mem, extra), d)
            derphi0 = (g * d).sum(1)
            descent = torch.isfinite(derphi0) & (derphi0 < 0)
            stuck = rows & ~descent
            alpha_max = self.method.max_step(state.x, d, lower, upper)
            stuck = stuck | (rows & (alpha_max <= 0))
            state.status = torch.where(stuck, int(Status.LINE_SEARCH_FAILED), state.status)
            rows = rows & ~stuck
            boxed = torch.isfinite(lower).all(1) & torch.isfinite(upper).all(1)
            first = (state.nit == 0) & ~boxed
            dnorm = torch.clamp(torch.linalg.vector_norm(d, dim=1), min=1e-300)
            alpha0 = torch.where(first & ~retry, torch.minimum(1.0 / dnorm, alpha_max),
                                 torch.clamp(alpha_max, max=1.0))
            steepest = torch.zeros_like(rows)
        else:
            gg = (g * g).sum(1)
            steepest = rows & (~descent | retry)
            self.method.reset(mem, rows & ~descent)
            d = torch.where(_col(steepest), -g, d)
            derphi0 = torch.where(steepest, -gg, derphi0)
            alpha0 = self.method.initial_step(state.nit, state.f, state.f_prev, g, derphi0)
            fresh = torch.clamp(1.0 / torch.clamp(g.abs().amax(1), min=1e-300), max=1.0)
            alpha0 = torch.where(retry, fresh, alpha0)
        if self.wolfe:
            new = self.rule.start(state.f, derphi0, alpha0, rows, alpha_max)
        else:
            new = self.rule.start(state.f, derphi0, alpha0, rows)
        old = self._search(state)
        if old is None:
            merged = new
            # Before the first evaluation (a solve cancelled at once, say) the "last trial"
            # is the start itself.
            mem[_TRIAL + "x"], mem[_TRIAL + "f"], mem[_TRIAL + "g"] = state.x, state.f, state.g
            if self.name == "gauss-newton":
                mem[_TRIAL + "r"], mem[_TRIAL + "J"] = mem["r"], mem["J"]
            if self.name == "newton":
                mem[_TRIAL + "H"] = mem["H"]
            mem[_LS + "d"], mem[_LS + "derphi0"], mem[_LS + "steepest"] = d, derphi0, steepest
        else:
            merged = _where_rows(rows, new, old)
            mem[_LS + "d"] = torch.where(_col(rows), d, mem[_LS + "d"])
            mem[_LS + "derphi0"] = torch.where(rows, derphi0, mem[_LS + "derphi0"])
            mem[_LS + "steepest"] = torch.where(rows, steepest, mem[_LS + "steepest"])
        self._keep_search(state, merged)


def _select_rows(search, rows: Tensor):
    return dataclasses.replace(search, **{
        f.name: getattr(search, f.name).index_select(0, rows) for f in dataclasses.fields(search)})


def _scatter_rows(full, rows: Tensor, part):
    return dataclasses.replace(full, **{
        f.name: getattr(full, f.name).index_copy(0, rows, getattr(part, f.name))
        for f in dataclasses.fields(full)})


def _where_rows(rows: Tensor, new, old):
    return dataclasses.replace(old, **{
        f.name: torch.where(rows, getattr(new, f.name), getattr(old, f.name))
        for f in dataclasses.fields(old)})


def stop_searches(state: BatchState, status: Status) -> None:
    """Every running member ends with `status` at its last accepted point (cancel, time)."""
    state.status = torch.where(state.status == RUNNING, int(status), state.status)
