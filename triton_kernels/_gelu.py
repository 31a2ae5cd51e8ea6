"""GELU and its derivative as Triton device functions (shared by geglu and bias_gelu)."""

from ._dispatch import tl, triton

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi), the tanh-approximation constant
INV_SQRT_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi), the normal density's constant
CUBIC = tl.constexpr(0.044715)  # the tanh approximation's cubic coefficient


@triton.jit
def gelu_and_grad(x, APPROX_TANH: tl.constexpr):
    """(gelu(x), d gelu / dx) for float32 ``x``."""
    if APPROX_TANH:
        u = SQRT_2_OVER_PI * (x + CUBIC * x * x * x)
        # tanh(+-20) is +-1 in float32 already; clamping avoids exp overflow in sigmoid(2u)
        u = tl.minimum(tl.maximum(u, -20.0), 20.0)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0  # tanh(u), written with the sigmoid Triton has
        y = 0.5 * x * (1.0 + t)
        du = SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * x * x)  # d u / d x
        dy = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
    else:
        cdf = 0.5 * (1.0 + tl.erf(x * INV_SQRT_2))
        y = x * cdf
        dy = cdf + x * INV_SQRT_2PI * tl.exp(-0.5 * x * x)
    return y, dy
