"""Device mesh, logical-axis sharding rules and batch placement.

The mesh has the axes ``('data', 'model')`` (``config.sharding.mesh_axes``). The batch is split
over 'data' along its leading dimension and replicated over 'model'. Parameters are replicated
by default; with ``shard_params=True`` (FSDP-style) the logical axes 'conv_out' and 'mlp' of the
variables (see ``oanet_jax.modeling.layers``) map to 'model', with 'conv_in' and 'embed' as
fallbacks. A dimension is only sharded when the mesh axis size divides it (a 5-way classifier
on a 2-way 'model' axis stays replicated), and a mesh axis is used at most once per variable.
The optimizer state follows its parameters; scalars are replicated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
MODEL_AXIS = "model"

# Logical axis -> mesh axis, in priority order (earlier rules claim a mesh axis first).
_SHARDED_RULES = (
    ("conv_out", MODEL_AXIS),
    ("mlp", MODEL_AXIS),
    ("conv_in", MODEL_AXIS),
    ("embed", MODEL_AXIS),
)
_REPLICATED_AXES = ("conv_h", "conv_w", "conv_in", "conv_out", "norm", "embed", "mlp")

_distributed_initialized = False


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces the (at most one) -1 in `mesh_shape` by the remaining device count.

    Args:
      mesh_shape: e.g. (-1, 1) or (4, 2).
      num_devices: number of devices to lay out.

    Returns:
      The concrete shape, whose product is `num_devices`.
    """
    shape = [int(s) for s in mesh_shape]
    if shape.count(-1) > 1:
        raise ValueError(f"mesh_shape may contain at most one -1, got {tuple(mesh_shape)}")
    known = math.prod(s for s in shape if s != -1)
    if known <= 0 or num_devices % known:
        raise ValueError(f"mesh_shape {tuple(mesh_shape)} does not divide {num_devices} devices")
    shape = [num_devices // known if s == -1 else s for s in shape]
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh_shape {tuple(mesh_shape)} does not match {num_devices} devices")
    return tuple(shape)


def make_mesh(sharding_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The device mesh of ``config.sharding``.

    Args:
      sharding_config: ``config.sharding`` (mesh_shape with -1 = all remaining devices,
        mesh_axes, normally ('data', 'model')).
      devices: devices to use (default: all of ``jax.devices()``, every host).

    Returns:
      A ``jax.sharding.Mesh`` with axis names ``mesh_axes``.
    """
    devices = list(jax.devices() if devices is None else devices)
    axes = tuple(sharding_config.mesh_axes)
    shape = resolve_mesh_shape(sharding_config.mesh_shape, len(devices))
    if len(axes) != len(shape):
        raise ValueError(f"mesh_axes {axes} and mesh_shape {shape} differ in length")
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, axes)


def logical_axis_rules(sharding_config: Any) -> tuple[tuple[str, str | None], ...]:
    """Logical axis rules (flax ``LogicalRules``) for the variables of the model.

    Args:
      sharding_config: ``config.sharding`` (uses shard_params).

    Returns:
      ((logical_name, mesh_axis or None), ...), in priority order.
    """
    if bool(sharding_config.shard_params):
        named = {name for name, _ in _SHARDED_RULES}
        return _SHARDED_RULES + tuple((a, None) for a in _REPLICATED_AXES if a not in named)
    return tuple((a, None) for a in _REPLICATED_AXES)


def mesh_partition_spec(
    logical: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, str | None]],
) -> PartitionSpec:
    """Maps one variable's logical axis names to a PartitionSpec on `mesh`.

    Rules are applied in order; a rule (logical, mesh_axis) shards every dimension named
    `logical` on `mesh_axis` if that mesh axis is not yet used by this variable and its size
    divides the dimension. Everything else is replicated. Logical names without a rule are
    replicated.

    Args:
      logical: logical axis names of the variable (None entries or None: unnamed).
      shape: the variable's shape.
      mesh: the mesh.
      rules: :func:`logical_axis_rules`.

    Returns:
      A PartitionSpec of len(shape) entries (mesh axis name or None).
    """
    out: list[str | None] = [None] * len(shape)
    if not logical:
        return PartitionSpec(*out)
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    for name, mesh_axis in rules:
        if mesh_axis is None or mesh_axis in used or mesh_axis not in mesh.shape:
            continue
        size = mesh.shape[mesh_axis]
        if size == 1:  # sharding over one device is replication
            continue
        for i, (lname, dim) in enumerate(zip(logical, shape, strict=True)):
            if lname == name and out[i] is None and mesh_axis not in used and dim % size == 0:
                out[i] = mesh_axis
                used.add(mesh_axis)
    return PartitionSpec(*out)


def tree_shardings(abstract_boxed: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedShardings for a (possibly boxed) pytree of arrays / ShapeDtypeStructs.

    Args:
      abstract_boxed: a pytree whose leaves are arrays or ShapeDtypeStructs, some of them inside
        ``nn.Partitioned`` / ``nn.LogicallyPartitioned`` boxes carrying logical axis names
        (e.g. ``jax.eval_shape(model.init, ...)``).
      mesh: the mesh.
      rules: :func:`logical_axis_rules`.

    Returns:
      A pytree with the structure of the *unboxed* tree and a NamedSharding per leaf; unnamed
      leaves (scalars, step counters) are replicated.
    """

    def one(x: Any) -> NamedSharding:
        if isinstance(x, nn.meta.AxisMetadata):
            names = tuple(getattr(x, "names", ()) or ())
            value = x.unbox()
            return NamedSharding(mesh, mesh_partition_spec(names, value.shape, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of every batch array: leading (batch) dimension on 'data', the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Places this host's batch on the mesh as global arrays split over 'data'.

    Uses ``jax.make_array_from_process_local_data``: with several hosts each passes its own
    per-host batch [B_host, ...] and the global array is [B_host * process_count, ...]. 64-bit
    host arrays are converted to JAX's canonical (32-bit unless x64 is enabled) dtypes first.

    Args:
      batch: dict of numpy arrays with a common leading dimension B_host (divisible by the
        number of 'data' shards on this host).
      mesh: the mesh.

    Returns:
      Dict of jax.Arrays, same keys, sharded with :func:`batch_sharding`.
    """
    sharding = batch_sharding(mesh)

    def put(x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        x = np.asarray(x)
        x = x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)
        return jax.make_array_from_process_local_data(sharding, x)

    return {k: put(v) for k, v in batch.items()}


def batch_split_problems(global_batch: int, processes: int, data_axis: int) -> list[str]:
    """What cannot split a global batch evenly: the one rule of the batch's divisibility.

    The global batch is split over the processes (each reads its own shard of the input) and
    over the 'data' mesh axis; both must divide it (`host_batch_size` at run time,
    `oanet_jax.config_check` before anything is read).

    Args:
      global_batch: ``config.train.batch_size``.
      processes: the process count.
      data_axis: the size of the mesh's 'data' axis.

    Returns:
      Descriptions of what does not divide it ("3 processes", "the 3-way 'data' axis"); empty
      when the batch splits.
    """
    problems = []
    if global_batch % processes:
        problems.append(f"{processes} processes")
    if global_batch % data_axis:
        problems.append(f"the {data_axis}-way '{DATA_AXIS}' axis")
    return problems


def host_batch_size(global_batch: int, mesh: Mesh) -> int:
    """This process's share of the global batch, after checking that the mesh can hold it.

    The global batch is what a run (and a resume on another slice) keeps fixed: it is split
    evenly over the processes (each reads its own shard of the input) and over the 'data' axis
    of the mesh.

    Args:
      global_batch: ``config.train.batch_size``.
      mesh: the device mesh (its 'data' axis splits the batch).

    Returns:
      The per-process batch ``global_batch // jax.process_count()``.

    Raises:
      ValueError: the global batch cannot be split over the processes or the 'data' axis (e.g.
        a checkpoint of global batch 8 resumed on a 3-way 'data' axis), naming the sizes that
        would work.
    """
    problems = batch_split_problems(
        global_batch, jax.process_count(), int(mesh.shape.get(DATA_AXIS, 1))
    )
    if problems:
        divisors = [d for d in range(1, global_batch + 1) if global_batch % d == 0]
        raise ValueError(
            f"train.batch_size (global batch) {global_batch} cannot be split evenly over "
            f"{' and '.join(problems)} (mesh {dict(mesh.shape)}). A resumed run keeps the "
            "checkpoint's global batch so that it continues the same data stream: choose a "
            "slice / sharding.mesh_shape whose "
            f"process count and '{DATA_AXIS}' axis divide {global_batch} (one of {divisors}), "
            "or set train.batch_size explicitly (the data stream then differs from the "
            "original run's)."
        )
    return global_batch // jax.process_count()


def distributed_kwargs(sharding_config: Any) -> dict[str, Any]:
    """Keyword arguments of ``jax.distributed.initialize`` from ``config.sharding``.

    ``coordinator_address`` (empty), ``num_processes`` (-1) and ``process_id`` (-1) that are not
    set are left out, so that JAX detects them (Cloud TPU, SLURM, Open MPI, Kubernetes, or the
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables).

    Args:
      sharding_config: ``config.sharding``.

    Returns:
      A dict with the keys that are set.
    """
    kwargs: dict[str, Any] = {}
    address = str(sharding_config.get("coordinator_address", "") or "")
    if address:
        kwargs["coordinator_address"] = address
    num_processes = int(sharding_config.get("num_processes", -1))
    if num_processes > 0:
        kwargs["num_processes"] = num_processes
    process_id = int(sharding_config.get("process_id", -1))
    if process_id >= 0:
        if num_processes > 0 and process_id >= num_processes:
            raise ValueError(
                f"sharding.process_id {process_id} is not in [0, sharding.num_processes "
                f"{num_processes})"
            )
        kwargs["process_id"] = process_id
    return kwargs


def maybe_initialize_distributed(sharding_config: Any) -> bool:
    """Calls ``jax.distributed.initialize()`` once when ``config.sharding.distributed`` is set.

    Must run before any other JAX call that touches devices. ``sharding.coordinator_address``,
    ``num_processes`` and ``process_id`` are passed when set (see :func:`distributed_kwargs`),
    otherwise JAX detects them. ``sharding.cpu_collectives`` ('gloo' or 'mpi') selects the
    collectives of the CPU backend, needed for a cluster of CPU processes (e.g. several processes
    on one machine, as the tests run it); '' keeps JAX's default (no cross-process CPU
    collectives).

    Args:
      sharding_config: ``config.sharding`` (uses distributed, coordinator_address,
        num_processes, process_id, cpu_collectives).

    Returns:
      True if the distributed runtime is (now) initialized by this function.
    """
    global _distributed_initialized
    if not bool(getattr(sharding_config, "distributed", False)):
        return False
    if not _distributed_initialized:
        kwargs = distributed_kwargs(sharding_config)
        collectives = str(sharding_config.get("cpu_collectives", "") or "")
        if collectives:
            if collectives not in ("gloo", "mpi"):
                raise ValueError(
                    f"sharding.cpu_collectives must be '', 'gloo' or 'mpi', got {collectives!r}"
                )
            jax.config.update("jax_cpu_collectives_implementation", collectives)
        jax.distributed.initialize(**kwargs)
        _distributed_initialized = True
        logging.info(
            "jax.distributed initialized: process %d of %d, %d global devices",
            jax.process_index(),
            jax.process_count(),
            jax.device_count(),
        )
    return True


# Processes may reach a first collective minutes apart (one compiles more slowly, or loads the
# persistent compilation cache while another compiles), while the CPU backend's gloo collectives
# give up after 30 s; barriers of the coordination service wait this long instead.
BARRIER_TIMEOUT_S = 3600


def sync_processes(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Waits until every process reaches the barrier ``name`` (no-op with one process).

    A barrier of the ``jax.distributed`` coordination service (no device collective), so that
    the first collective after it starts on all processes at about the same time.

    Args:
      name: barrier name, unique per barrier in the process's life.
      timeout_s: seconds to wait for the other processes before raising.
    """
    if jax.process_count() == 1:
        return
    import orbax.checkpoint as ocp

    ocp.multihost.get_barrier_sync_fn()(key=f"oanet_{name}", timeout_ms=int(timeout_s * 1000))


def gather_to_host(tree: Any) -> Any:
    """Every array of `tree` whole, as numpy, on every process (all processes must call it).

    Global arrays spread over several processes' devices (the training state of a multi-host
    run, replicated or sharded on 'model') are all-gathered; with one process the arrays are
    only copied to the host.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def broadcast_from_main(obj: Any, name: str) -> Any:
    """Process 0's `obj` (any picklable value) on every process; all processes must call it.

    The processes first meet at the barrier ``name`` (`sync_processes`), so that process 0 may
    arrive long after the others (e.g. from an evaluation that only it runs) without their
    collective timing out.

    Args:
      obj: the value on process 0 (ignored elsewhere).
      name: barrier name, unique per call in the process's life.

    Returns:
      Process 0's `obj`.
    """
    if jax.process_count() == 1:
        return obj
    import pickle

    from jax.experimental import multihost_utils

    sync_processes(name)
    main = jax.process_index() == 0
    data = np.frombuffer(pickle.dumps(obj), np.uint8) if main else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    buffer = data if main else np.zeros(size, np.uint8)
    return pickle.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes())


def sync_after_first_compile(fn: Any, name: str) -> Any:
    """Wraps a jitted function: its first call compiles, waits for every process, then runs.

    With several processes, the first execution of a sharded program runs collectives across
    them; compiling ahead of time (``fn.lower(*args).compile()``, which jit's own cache reuses)
    and then waiting at :func:`sync_processes` keeps the slowest compiler from making the
    others' collectives time out. Later calls go straight to ``fn``.

    Args:
      fn: a ``jax.jit`` function.
      name: barrier name.

    Returns:
      A callable with ``fn``'s signature.
    """
    if jax.process_count() == 1:
        return fn
    done = False

    def call(*args: Any) -> Any:
        nonlocal done
        if not done:
            fn.lower(*args).compile()
            sync_processes(f"{name}_compiled")
            done = True
        return fn(*args)

    return call
