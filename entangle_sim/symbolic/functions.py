"""SymPy primitives with known derivatives, printed to numerically careful JAX.

`LogSigmoid(x) = log sigma(x)`, `Sigmoid(x)`, `Log1mExp(x) = log(1 - e^x)` (x < 0). They keep the
symbolic forms short (derivatives stay in sigma form, e.g. d/dx log sigma(x) = sigma(-x)) and are
printed to `jax.nn.log_sigmoid`, `jax.nn.sigmoid` and a stable log1mexp, never `log(sigmoid(x))`.
"""
from __future__ import annotations

import functools

import sympy as sp
from sympy.codegen.cfunctions import expm1
from sympy.printing.numpy import JaxPrinter, NumPyPrinter


class Sigmoid(sp.Function):
    """Logistic function sigma(x) = 1/(1+e^-x); sigma'(x) = sigma(x) sigma(-x)."""

    nargs = 1

    def fdiff(self, argindex=1):
        x = self.args[0]
        return Sigmoid(x) * Sigmoid(-x)

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return sp.Rational(1, 2)
        if x is sp.oo:
            return sp.S.One
        if x is sp.S.NegativeInfinity:
            return sp.S.Zero

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_positive(self):
        return True if self.args[0].is_real else None

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return 1 / (1 + sp.exp(-x))

    def _latex(self, printer, exp=None):
        tex = r"\sigma\left(%s\right)" % printer._print(self.args[0])
        return tex if exp is None else r"%s^{%s}" % (tex, exp)


class LogSigmoid(sp.Function):
    """log sigma(x) = -log(1 + e^-x); d/dx = sigma(-x)."""

    nargs = 1

    def fdiff(self, argindex=1):
        return Sigmoid(-self.args[0])

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return -sp.log(2)

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_negative(self):
        return True if self.args[0].is_real else None

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return -sp.log(1 + sp.exp(-x))

    def _latex(self, printer, exp=None):
        tex = r"\log\sigma\left(%s\right)" % printer._print(self.args[0])
        return tex if exp is None else r"\left(%s\right)^{%s}" % (tex, exp)


class Log1mExp(sp.Function):
    """log(1 - e^x) for x < 0; d/dx = -1/expm1(-x)."""

    nargs = 1

    def fdiff(self, argindex=1):
        return -1 / expm1(-self.args[0])

    def _eval_is_real(self):
        return True if self.args[0].is_negative else None

    def _eval_is_negative(self):
        return True if self.args[0].is_negative else None

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return sp.log(1 - sp.exp(x))

    def _latex(self, printer, exp=None):
        tex = r"\log\left(1 - e^{%s}\right)" % printer._print(self.args[0])
        return tex if exp is None else r"\left(%s\right)^{%s}" % (tex, exp)


def to_exp(expr: sp.Expr) -> sp.Expr:
    """Rewrite the custom functions in elementary form (for simplification and numeric checks)."""
    return expr.rewrite(sp.exp).subs({})


class EntanglePrinter(JaxPrinter):
    """JAX printer that knows the custom functions and prints Heaviside(0) = 1/2 without NaNs."""

    def _print_Sigmoid(self, e):
        return f"jax.nn.sigmoid({self._print(e.args[0])})"

    def _print_LogSigmoid(self, e):
        return f"jax.nn.log_sigmoid({self._print(e.args[0])})"

    def _print_Log1mExp(self, e):
        return f"jax_log1mexp({self._print(e.args[0])})"   # bound in the lambdify namespace

    def _print_DiracDelta(self, e):
        # Second derivatives of hinges: zero almost everywhere, which is what autodiff returns too.
        return f"(0.0 * {self._print(e.args[0])})"

    def _print_Heaviside(self, e):
        x = self._print(e.args[0])
        return f"jax.numpy.where({x} > 0, 1.0, jax.numpy.where({x} < 0, 0.0, 0.5))"


def jax_log1mexp(x):
    """Stable log(1 - e^x), x < 0 (Maechler 2012): log(-expm1(x)) near 0, log1p(-e^x) far from 0.

    The double `where` keeps the unused branch finite so gradients never pick up NaN.
    """
    import jax.numpy as jnp

    near = x > -0.6931471805599453  # -log 2
    x_near = jnp.where(near, x, -1.0)
    x_far = jnp.where(near, -1.0, x)
    return jnp.where(near, jnp.log(-jnp.expm1(x_near)), jnp.log1p(-jnp.exp(x_far)))


@functools.lru_cache(maxsize=4096)
def _lambdify(args: tuple, expr: sp.Expr):
    import jax  # noqa: F401  (the printed code refers to these modules by name)
    import jax.numpy  # noqa: F401

    ns = {"jax": jax, "jax_log1mexp": jax_log1mexp, "functools": functools}
    return sp.lambdify(args, expr, modules=[ns, "jax"], printer=EntanglePrinter(
        {"fully_qualified_modules": True, "inline": True, "allow_unknown_functions": True}), cse=True)


def _as_exp_term(t):
    """(coefficient, x) for a term coefficient * exp(x) with one exp factor, else None."""
    exps = [a for a in sp.Mul.make_args(t) if isinstance(a, sp.exp)]
    if len(exps) != 1:
        return None
    return sp.Mul(*[a for a in sp.Mul.make_args(t) if a is not exps[0]]), exps[0].args[0]


def _scaled_exp_difference(add):
    """c exp(a) - c exp(b) + rest  ->  c exp(m) (exp(a - m) - exp(b - m)) + rest, m = max(a, b):
    the difference keeps its sign and magnitude (+-inf) where both exponentials overflow."""
    terms = list(add.args)
    parsed = [_as_exp_term(t) for t in terms]
    for i, p in enumerate(parsed):
        for j in range(i + 1, len(terms)):
            q = parsed[j]
            if p is None or q is None or sp.expand(p[0] + q[0]) != 0:
                continue
            m = sp.Max(p[1], q[1])
            diff = sp.Add(sp.exp(p[1] - m), -sp.exp(q[1] - m), evaluate=False)
            rest = [t for k, t in enumerate(terms) if k not in (i, j)]
            return sp.Add(*rest, sp.Mul(p[0], sp.exp(m), diff, evaluate=False))
    return add


@functools.lru_cache(maxsize=1024)
def log_space_products(expr: sp.Expr):
    """`expr` rewritten for floating point where it overflows: every product exp(a) sigma(b) ... as
    exp(a + log sigma(b)) ... and every difference c exp(a) - c exp(b) as c exp(m) (exp(a - m) -
    exp(b - m)), m = max(a, b) (equal mathematically; no inf * 0 or inf - inf). None if nothing changes.

        >>> x, y = sp.symbols("x y")
        >>> log_space_products(2 * sp.exp(x) * Sigmoid(y))
        2*exp(x + LogSigmoid(y))
    """
    def merge(m):
        exps = [a for a in m.args if isinstance(a, sp.exp)]
        sigs = [a for a in m.args if isinstance(a, Sigmoid)]
        if not exps or not sigs:
            return m
        rest = [a for a in m.args if not isinstance(a, (sp.exp, Sigmoid))]
        arg = sp.Add(*[a.args[0] for a in exps], *[LogSigmoid(g.args[0]) for g in sigs])
        return sp.Mul(*rest, sp.exp(arg))

    out = expr.replace(lambda a: a.is_Add, _scaled_exp_difference)
    out = out.replace(lambda a: a.is_Mul, merge)
    return None if out == expr else out


def lambdify_jax(args, expr: sp.Expr):
    """Compile `expr` to a JAX-traceable function of the symbols `args` (cached)."""
    return _lambdify(tuple(args), expr)


class EntangleNumPyPrinter(NumPyPrinter):
    """NumPy twin of `EntanglePrinter` (float64 everywhere, no JAX configuration needed)."""

    def _print_Sigmoid(self, e):
        return f"numpy.exp(-numpy.logaddexp(0, -({self._print(e.args[0])})))"

    def _print_LogSigmoid(self, e):
        return f"(-numpy.logaddexp(0, -({self._print(e.args[0])})))"

    def _print_Log1mExp(self, e):
        return f"numpy.log(-numpy.expm1({self._print(e.args[0])}))"

    def _print_DiracDelta(self, e):
        return f"(0.0 * {self._print(e.args[0])})"

    def _print_Heaviside(self, e):
        return f"numpy.heaviside({self._print(e.args[0])}, 0.5)"


@functools.lru_cache(maxsize=1024)
def _lambdify_np(args: tuple, expr: sp.Expr):
    import numpy

    return sp.lambdify(args, expr, modules=[{"numpy": numpy, "functools": functools}, "numpy"],
                       printer=EntangleNumPyPrinter(
        {"fully_qualified_modules": True, "inline": True, "allow_unknown_functions": True}), cse=True)


def lambdify_numpy(args, expr: sp.Expr):
    """Compile `expr` to a float64 NumPy function of the symbols `args` (cached)."""
    return _lambdify_np(tuple(args), expr)


def clear_lambdify_cache() -> None:
    """Forget every compiled formula (JAX and NumPy), e.g. for cold-start benchmarks."""
    _lambdify.cache_clear()
    _lambdify_np.cache_clear()
