"""Scale-out and the GPU path of the training loops (DESIGN §5.4): torchrun / DDP, devices, mixed
precision, batches built in worker processes.

**Processes.** ``medssl pretrain|finetune ... --nproc N`` calls :func:`launch`, which starts N
workers on this machine through ``torch.distributed.run`` — the library behind ``torchrun`` —
each running the same command without ``--nproc``; ``torchrun --nnodes ... -m medssl_kit
pretrain ...`` starts them itself (multi-node). A worker sees torchrun's ``RANK`` /
``WORLD_SIZE`` / ``LOCAL_RANK`` and joins the process group in :func:`session` (gloo on CPU,
nccl on CUDA); without them it is a run of one process, on exactly the code path it always ran.
The loops wrap the model in ``DistributedDataParallel`` (:func:`data_parallel`), draw each rank's
share of the global batch (:func:`rank_share`), and let rank 0 alone write the run folder.

**A failed worker.** Workers started by :func:`launch` write their error (one line) into a folder
the launcher reads (:func:`reported_to_launcher`); when any worker fails, torchrun stops the
others and :func:`launch` raises one :class:`~medssl_kit.errors.MedsslError` naming the first
failed rank, its exit code and its error — the CLI's one line. A worker that fails only because a
peer died (a collective broken off) is reported as such and not blamed.

**Devices and precision.** :func:`select_device` (``auto`` | ``cpu`` | ``cuda``; a rank takes the
GPU of its ``LOCAL_RANK``), :func:`precision` (autocast in bfloat16 where the device supports
it, else float16 with a gradient scaler; bfloat16 on CPU) and :func:`step_batches` (batches built
by ``DataLoader`` worker processes, pinned for the GPU; with 0 workers, built in the loop as
always).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, Dataset

from medssl_kit.config import get_profile
from medssl_kit.distributed import (
    all_gather_object,
    broadcast_object,
    derived_seed,
    env_local_rank,
    env_rank,
    env_world_size,
    rank,
    world_size,
)
from medssl_kit.errors import MedsslError

T = TypeVar("T")

DEVICES = ("auto", "cpu", "cuda")
WORKER_MODULE = "medssl_kit"  # what `launch` runs: python -m WORKER_MODULE <argv>
ERRORS_ENV = "MEDSSL_LAUNCH_ERRORS"  # the folder where launched workers write their error
COLLECTIVE_TIMEOUT = timedelta(minutes=60)  # rank 0 validates while the others wait
SEED_TAG_STEP, SEED_TAG_RANK = 1, 2  # derived_seed's first key: which stream a seed is for


# --- devices and precision -------------------------------------------------------------------


def select_device(name: str, local_rank: int = 0) -> torch.device:
    """The device a run asks for: ``"auto"`` (CUDA when PyTorch sees a GPU, else the CPU),
    ``"cpu"``, ``"cuda"`` (the GPU of ``local_rank``) or ``"cuda:K"``. Asking for CUDA where
    there is none, or for a GPU the machine lacks, is a :class:`MedsslError`."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise MedsslError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise MedsslError(
            f"--device {name}: PyTorch sees no CUDA GPU on this machine "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False); use --device cpu "
            "or auto"
        )
    index = local_rank if name in ("auto", "cuda") else int(name.partition(":")[2])
    count = torch.cuda.device_count()
    if index >= count:
        raise MedsslError(
            f"--device {name}: needs GPU {index}, but this machine has {count}; start at most "
            f"{count} processes per machine"
        )
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Precision:
    """How a training step runs: ``dtype`` of autocast (``None``: full float32) and whether a
    gradient scaler guards float16 gradients."""

    dtype: torch.dtype | None
    scaler: bool

    @contextmanager
    def autocast(self, device: torch.device) -> Iterator[None]:
        """The autocast context of a step (disabled without a ``dtype``); on the CPU in
        bfloat16 with :class:`Depth2Conv3dInFloat32`."""
        with torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None):
            if device.type == "cpu" and self.dtype == torch.bfloat16:
                with Depth2Conv3dInFloat32():
                    yield
            else:
                yield


class Depth2Conv3dInFloat32(TorchFunctionMode):
    """Runs a 3D convolution whose input is two slices deep in float32 under CPU bfloat16
    autocast, every other operation as autocast decides.

    PyTorch's oneDNN bfloat16 convolution (torch 2.13, CPU) computes a wrong weight gradient
    when a ``conv3d``'s input has depth 2: relative error 0.8 to inf against float32, NaN in
    about half the calls, on every call tried (3×3×3, stride 1; depths 1, 3, 4, strided and
    transposed convolutions were right, as was float32). A 5-level U-Net or a 6-level FPN on a
    32-slice patch has such a level, so a 3D run in bfloat16 on the CPU trained its deepest
    layers on garbage. Those maps are small: float32 there costs nothing measurable
    (``benchmarks/bench_cpu_bf16_conv3d.py``). Disabling oneDNN instead is right but ~130×
    slower in bfloat16.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv3d and _depth(args[0] if args else kwargs["input"]) == 2:
            with torch.autocast("cpu", enabled=False):
                return func(
                    *map(_in_float32, args), **{k: _in_float32(v) for k, v in kwargs.items()}
                )
        return func(*args, **kwargs)


def _depth(x: torch.Tensor) -> int | None:
    """The depth of a batched 3D input ``[N, C, D, H, W]`` (``None`` for an unbatched one)."""
    return x.shape[2] if x.dim() == 5 else None


def _in_float32(value):
    """``value`` in float32 where it is a floating-point tensor, else as it is."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    return value


def precision(device: torch.device, amp: bool) -> Precision:
    """Mixed precision for ``device``: off without ``amp``; on CUDA bfloat16 where the GPU
    supports it (Ampere and later), else float16 with a gradient scaler; on the CPU bfloat16
    (CPU autocast's type, no scaler needed)."""
    if not amp:
        return Precision(None, False)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, False)
        return Precision(torch.float16, True)
    return Precision(torch.bfloat16, False)


def native_cpu_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX, e.g. AMD Zen 4, Intel
    Sapphire Rapids), where bfloat16 autocast runs a convolution step in 0.5–0.7 of the float32
    time (docs/results/i35); elsewhere it is emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and bool(
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        )
    except (AttributeError, RuntimeError):  # private helpers: absent in some builds
        return False


def default_amp(device: torch.device, profile: str | None) -> bool:
    """Mixed precision when a run leaves ``amp`` unset: on CUDA; on the CPU where the profile
    asks for it (:attr:`~medssl_kit.config.Profile.cpu_amp`: the laptop's) and the CPU computes
    bfloat16 natively (:func:`native_cpu_bfloat16`)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and get_profile(profile).cpu_amp and native_cpu_bfloat16()


def default_workers(device: torch.device) -> int:
    """Batch-building worker processes per rank: none on the CPU (the cores train), on CUDA up
    to 4, sharing this machine's cores between its ranks (torchrun's ``LOCAL_WORLD_SIZE``)."""
    if device.type != "cuda":
        return 0
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(4, (os.cpu_count() or 1) // max(1, ranks_here) - 1))


def numerics() -> dict[str, Any]:
    """What decides a run's floating-point order besides its inputs: the intra-op thread count and
    the CPU kernels PyTorch dispatches to (e.g. ``AVX2``, ``AVX512``). Runs agree bit for bit only
    where both agree; a rerun on another machine or thread count is a new draw of training noise."""
    return {
        "threads": torch.get_num_threads(),
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
    }


def channels_last(device: torch.device, dims: int, wanted: bool | None) -> bool:
    """Whether 2D convolutions run in ``channels_last`` (NHWC): ``wanted``, or by default on CUDA
    for 2D networks (tensor cores prefer it under mixed precision); 3D stays NCDHW."""
    return bool(wanted) if wanted is not None else device.type == "cuda" and dims == 2


# --- the process group -----------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    """Where this process trains: its device, rank and the number of processes."""

    device: torch.device
    rank: int
    world_size: int

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs and writes the run folder."""
        return self.rank == 0


@contextmanager
def session(device: str) -> Iterator[Session]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1; gloo on CPU, nccl on
    CUDA) for the block, unless one is initialised already (then it is used and left alone);
    select the device (a rank's GPU is its ``LOCAL_RANK``'s). One process: no group at all."""
    launched = env_world_size() > 1 and not dist.is_initialized()
    selected = select_device(device, env_local_rank() if env_world_size() > 1 else 0)
    if selected.type == "cuda":
        torch.cuda.set_device(selected)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its kernels
    if launched:
        faulthandler.enable()  # a rank that crashes in native code prints its Python stack
        backend = "nccl" if selected.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    try:
        yield Session(selected, rank(), world_size())
    finally:
        if launched and dist.is_initialized():
            dist.destroy_process_group()


def exit_process(code: int | None) -> NoReturn:
    """End this process with ``code`` (``None``: 0). A worker of several (``WORLD_SIZE`` > 1)
    ends without the interpreter's teardown, once its output is flushed: its work is done, its
    files are closed and its process group is destroyed, and on a loaded machine a gloo rank
    aborted in that teardown in 2 of 46 resumed runs ("terminate called without an active
    exception", issue 37), failing a finished run. One process exits as usual."""
    if env_world_size() <= 1:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def on_rank_zero(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 alone; its result, or its :class:`MedsslError`, on every rank."""
    if world_size() == 1:
        return fn()
    outcome: tuple[str, Any] | None = None
    if rank() == 0:
        try:
            outcome = ("ok", fn())
        except MedsslError as err:
            outcome = ("error", str(err))
    outcome = broadcast_object(outcome)
    if outcome[0] == "error":
        raise MedsslError(outcome[1])
    return outcome[1]


def data_parallel(
    module: nn.Module, device: torch.device, find_unused_parameters: bool = True
) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` with several processes, else itself.

    ``find_unused_parameters`` where a step may leave parameters unused, and differently on each
    rank (pre-training: PCRLv2 trains one pyramid level per step, the backbones' segmentation
    head is unused; the slice classifier leaves the decoder unused)."""
    if world_size() == 1:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        module, device_ids=ids, find_unused_parameters=find_unused_parameters
    )


def rank_share(
    index: Sequence[int],
    step: int,
    seed: int,
    own: int | None = None,
    world: int | None = None,
) -> tuple[list[int], torch.Generator | None]:
    """Rank ``own``'s items of a global batch ``index`` and the generator of its views.

    Rank ``r`` of ``N`` takes ``index[r::N]`` (so a balanced global batch stays balanced per
    rank) and draws from a generator seeded by (``seed``, ``step``, ``r``); the global batch must
    divide by ``N``. With one process: ``(index, None)`` — the caller keeps the step's generator.
    ``own`` and ``world`` default to this process's rank and the number of processes.
    """
    world = world_size() if world is None else world
    own = rank() if own is None else own
    if world == 1:
        return list(index), None
    if len(index) % world:
        raise MedsslError(
            f"batch_size {len(index)} (the global batch) must be divisible by the {world} processes"
        )
    generator = torch.Generator().manual_seed(derived_seed(SEED_TAG_STEP, seed, step, own))
    return list(index[own::world]), generator


def seed_rank(seed: int) -> None:
    """Seed this process's global RNG (dropout) for training: ``seed`` with one process, a seed
    derived from (``seed``, rank) with several, so ranks draw different dropout masks."""
    if world_size() == 1:
        torch.manual_seed(seed)
    else:
        torch.manual_seed(derived_seed(SEED_TAG_RANK, seed, rank()))


def check_processes(batch_size: int, processes: int) -> None:
    """A clear error unless the global ``batch_size`` divides by the number of ``processes``."""
    if batch_size % processes:
        raise MedsslError(
            f"batch_size {batch_size} (the global batch) must be divisible by the {processes} "
            f"processes; choose a multiple of {processes} (--set batch_size=...)"
        )


def mean_terms(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Logged values of a step's terms: means over the ranks (one collective for all), or the
    terms themselves with one process."""
    if world_size() == 1:
        return {k: float(v.detach()) for k, v in terms.items()}
    values = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
    dist.all_reduce(values)
    values /= world_size()
    return dict(zip(terms, values.tolist(), strict=True))


# --- RNG states in checkpoints ---------------------------------------------------------------


def rng_entries(device: torch.device) -> dict[str, Any]:
    """The RNG entries of a checkpoint, gathered from every rank (every rank must call this):
    ``"rng"`` (this rank's CPU state, all a one-process CPU run saves), with several processes
    ``"world_size"`` and ``"rng_ranks"`` (every rank's CPU state), on CUDA ``"cuda_rng"``
    (every rank's CUDA state)."""
    cpu = torch.get_rng_state()
    entries: dict[str, Any] = {"rng": cpu}
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    if world_size() > 1:
        states = all_gather_object((cpu, cuda))
        entries.update(world_size=world_size(), rng_ranks=[s[0] for s in states])
        if cuda is not None:
            entries["cuda_rng"] = [s[1] for s in states]
    elif cuda is not None:
        entries["cuda_rng"] = [cuda]
    return entries


def restore_rng(ckpt: dict[str, Any], device: torch.device, path: Path) -> None:
    """Set this rank's RNG states from a checkpoint written by :func:`rng_entries`; a checkpoint
    of another number of processes is a :class:`MedsslError` (its draws would not continue)."""
    saved, world = int(ckpt.get("world_size", 1)), world_size()
    if saved != world:
        raise MedsslError(
            f"checkpoint '{path}' was written by a run of {saved} process(es); resume it with "
            f"{saved} (--nproc {saved}), not {world}"
        )
    torch.set_rng_state(ckpt["rng_ranks"][rank()] if world > 1 else ckpt["rng"])
    if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(ckpt["cuda_rng"][rank()], device)


# --- batches in worker processes -------------------------------------------------------------


class _Steps(Dataset):
    """Item ``i``: the batch of step ``steps[i]``, built by ``make``."""

    def __init__(self, make: Callable[[int], Any], steps: range):
        self.make, self.steps = make, steps

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> Any:
        return self.make(self.steps[i])


def step_batches(
    make: Callable[[int], Any], steps: range, workers: int = 0, pin_memory: bool = False
) -> Iterator[Any]:
    """The batches ``make(step)`` of ``steps``, in order.

    With ``workers`` > 0 a ``DataLoader`` builds them ahead in that many processes (pinned for
    a fast copy to the GPU with ``pin_memory``), so view sampling does not hold up the GPU;
    ``make`` seeds its own generators from the step, so the batches are those of ``workers=0``,
    which builds them in this process, just before each step (the loops' one-process path).
    Workers are forked: ``make`` and what it holds are not pickled."""
    if workers <= 0:
        return (make(step) for step in steps)
    loader = DataLoader(
        _Steps(make, steps),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),  # leaves the global RNG alone
        prefetch_factor=2,
    )
    return iter(loader)


def to_device(
    batch: dict[str, Any], device: torch.device, memory_format: torch.memory_format | None = None
) -> dict[str, Any]:
    """The batch's tensors on ``device`` (4-D ones in ``memory_format`` where given)."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=value.is_pinned())
            if memory_format is not None and value.ndim == 4 and value.is_floating_point():
                value = value.contiguous(memory_format=memory_format)
        out[key] = value
    return out


# --- the launcher ----------------------------------------------------------------------------


@contextmanager
def _kept_process_state(nproc: int, errors: str) -> Iterator[None]:
    """Restore what ``torch.distributed.run`` changes in the calling process (signal handlers,
    ``OMP_NUM_THREADS``, its loggers' levels) and keep its log quiet; give the workers the
    error folder and, unless set, ``OMP_NUM_THREADS`` = cores / processes."""
    names = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
    sigs = [getattr(signal, n) for n in names if hasattr(signal, n)]
    handlers = [(s, signal.getsignal(s)) for s in sigs]
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", ERRORS_ENV)}
    os.environ[ERRORS_ENV] = errors
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    loggers = [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name.startswith("torch.distributed")
    ]
    levels = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in levels:
            lg.setLevel(level)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for sig, handler in handlers:
            if handler is not None:
                signal.signal(sig, handler)


def launch(nproc: int, argv: Sequence[str]) -> None:
    """Run ``python -m medssl_kit <argv>`` in ``nproc`` processes on this machine through
    ``torch.distributed.run`` (``--standalone``, what ``torchrun --standalone
    --nproc_per_node=N`` does) and wait for them; a failed worker is a :class:`MedsslError`
    naming it (rank, exit code, its error)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = ["--standalone", f"--nproc_per_node={nproc}", "-m", WORKER_MODULE, *argv]
    with (
        tempfile.TemporaryDirectory(prefix="medssl-launch-") as errors,
        _kept_process_state(nproc, errors),
    ):
        try:
            torchrun.main(args)
        except ChildFailedError as err:
            raise MedsslError(failure_message(err.failures, Path(errors), nproc)) from None
        except SignalException as err:
            raise KeyboardInterrupt from err


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def failure_message(failures: dict[int, Any], errors: Path, nproc: int) -> str:
    """One line for failed workers (``{rank: failure with .exitcode}``): the first rank that
    failed of its own accord, its exit, and its reported error. Collateral: a rank that reported
    a peer's death, or one with no report ended by SIGTERM (how the launcher stops the survivors
    of a failed rank)."""
    reports = {}
    for r in failures:
        path = errors / f"rank-{r}.json"
        if path.is_file():
            reports[r] = json.loads(path.read_text())

    def collateral(r: int) -> bool:
        if r in reports:
            return bool(reports[r].get("collateral"))
        return failures[r].exitcode == -signal.SIGTERM

    own = [r for r in failures if not collateral(r)]
    first = min(own or failures, key=lambda r: (reports.get(r, {}).get("time", 0), r))
    line = f"rank {first} of {nproc} failed ({_exit_text(failures[first].exitcode)})"
    if first in reports:
        line += f": {reports[first]['message']}"
    return line


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _report(folder: str, message: str, collateral: bool) -> None:
    path = Path(folder) / f"rank-{env_rank()}.json"
    record = {"message": _one_line(message), "collateral": collateral, "time": time.time()}
    path.write_text(json.dumps(record))


# What a collective raises when a peer process died (gloo says so in a plain RuntimeError).
_PEER_GONE = ("closed by peer", "reset by peer", "Broken pipe", "remote worker crash")


def _broken_off(err: BaseException) -> bool:
    """Whether ``err`` is a collective broken off because another rank died."""
    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and any(text in str(err) for text in _PEER_GONE)
    )


@contextmanager
def reported_to_launcher() -> Iterator[None]:
    """In a worker started by :func:`launch`, send an error to the launcher instead of printing
    it: a :class:`MedsslError`, or a collective broken off because another rank died, ends the
    worker with exit code 1 and no output, the launcher printing the one line; any other
    exception is reported and re-raised (its traceback is for debugging). Elsewhere (one process,
    or workers torchrun started itself): nothing changes."""
    folder = os.environ.get(ERRORS_ENV)
    if not folder or env_world_size() == 1:
        yield
        return
    try:
        yield
    except MedsslError as err:
        _report(folder, str(err), collateral=False)
        raise SystemExit(1) from None
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        _report(folder, f"{type(err).__name__}: {first}", collateral=_broken_off(err))
        if _broken_off(err):
            raise SystemExit(1) from None
        raise
