"""Connected components of a label map with static shapes (pure jnp, jit-friendly).

Convention: 4-connectivity (a pixel touches the pixels above, below, left and right of it, as
``scipy.ndimage.label``'s default structure); two touching pixels are in one component when both
are ``valid`` and their labels are equal. A component is named by the smallest flat index
(``y * W + x``) of its pixels; invalid pixels get -1.

Algorithm: every valid pixel starts as its own root; each round takes the minimum root over the
same-label 4-neighbours (hooking), then shortcuts every pixel's root to its root's root twice
(pointer jumping), until nothing changes (``lax.while_loop``: shapes are static, only the number
of rounds depends on the data; it is at most the longest path inside a component and in practice
logarithmic in it thanks to the jumps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["connected_components", "component_sizes"]


def _neighbour_min(root: jax.Array, same: tuple[jax.Array, ...]) -> jax.Array:
    """Minimum of `root` over each pixel and its same-label 4-neighbours ([H, W] int32)."""
    big = jnp.iinfo(jnp.int32).max
    down, right = same
    out = root
    # Above/below: pixel (y, x) and (y + 1, x) are joined where ``down[y, x]``.
    below = jnp.where(down, root[1:], big)
    above = jnp.where(down, root[:-1], big)
    out = out.at[:-1].min(below)
    out = out.at[1:].min(above)
    rhs = jnp.where(right, root[:, 1:], big)
    lhs = jnp.where(right, root[:, :-1], big)
    out = out.at[:, :-1].min(rhs)
    out = out.at[:, 1:].min(lhs)
    return out


def connected_components(labels: jax.Array, valid: jax.Array) -> jax.Array:
    """4-connected components of equal labels among valid pixels.

    Args:
      labels: [H, W] integer labels.
      valid: [H, W] bool; invalid pixels belong to no component.

    Returns:
      [H, W] int32: for a valid pixel, the smallest flat index ``y * W + x`` of its component;
      -1 for invalid pixels.
    """
    h, w = labels.shape
    valid = valid.astype(bool)
    down = valid[:-1] & valid[1:] & (labels[:-1] == labels[1:])
    right = valid[:, :-1] & valid[:, 1:] & (labels[:, :-1] == labels[:, 1:])
    big = jnp.iinfo(jnp.int32).max
    start = jnp.where(valid, jnp.arange(h * w, dtype=jnp.int32).reshape(h, w), big)

    def jump(root: jax.Array) -> jax.Array:
        flat = root.ravel()
        return jnp.where(valid, flat[jnp.where(valid, root, 0)], big)

    def body(state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        root, _ = state
        new = jump(jump(_neighbour_min(root, (down, right))))
        return new, jnp.any(new != root)

    root, _ = jax.lax.while_loop(lambda s: s[1], body, (start, jnp.asarray(True)))
    return jnp.where(valid, root, -1)


def component_sizes(components: jax.Array) -> jax.Array:
    """Pixels of each pixel's component.

    Args:
      components: [H, W] int32 output of `connected_components` (-1 = no component).

    Returns:
      [H, W] int32: the size of the pixel's component (0 for -1 pixels).
    """
    flat = components.ravel()
    has = flat >= 0
    sizes = jnp.zeros(flat.shape, jnp.int32).at[jnp.where(has, flat, 0)].add(has.astype(jnp.int32))
    return jnp.where(has, sizes[jnp.maximum(flat, 0)], 0).reshape(components.shape)
