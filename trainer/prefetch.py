"""Batches made ahead of the step, in DataLoader worker processes: while the model computes, workers
read the next micro-batches' media (disk or S3), decode and scale them, run the processor (image
preprocessing, vision placeholders), tokenize and pad — the stage's collator call, on the CPU. The rank
only moves the ready Batch to its device.

    items = prefetch.training_items(order, rank, start_step, total, train)   # the loop's micro-batches
    with prefetch.Prefetcher.of(items, collator, collate.Collator.pairs, spec.data) as batches:
        batch = batches.take((step, micro, indices))     # in the stage's loss_of(step, micro, indices)

    with prefetch.Prefetcher.of(prefetch.blocks(pairs, size), collator, collate.Collator.pairs, spec.data) as made:
        for work, batch in made: ...                     # one pass over blocks of pairs, in order

`data.loaderWorkers` workers per rank (0: in the rank's process, inside the step, as before), each
`data.prefetchBatches` items ahead (DataLoader's prefetch_factor).

Order: a `torch.utils.data.DataLoader` over a map-style dataset, sequential sampler, `batch_size=None`:
item i is made by some worker but handed out i-th, so a pass sees exactly the items, in exactly the
order, that the in-process path makes. The data order (order.py) and a resumed run's position (the
training items start at the step resumed) are unchanged, and the batches are bit-identical to
`loaderWorkers: 0` (tests/unit/test_prefetch.py). The DataLoader gets its own torch.Generator: creating
its iterator draws a seed, which must not come from the global RNG that dropout and LoRA init use (a
resumed run would draw it at another point and stop being bit-identical).

Workers are forked from the rank when a pass starts (`multiprocessing_context="fork"`: the collator,
processor and pairs are inherited, not pickled; the model's tensors are never touched, so their pages
stay shared), with one CPU thread each (DataLoader sets it). `worker_init_fn`:
  * drops the inherited S3 client (s3client.forget_client): boto3 clients are not fork-safe, each worker
    builds its own on first use;
  * ignores SIGTERM: stopping is the rank's business (loop.py finishes the step and saves); a worker
    killed by a SIGTERM sent to the whole process group would fail the rank in the middle of that save.
    A worker exits when its pass ends (DataLoader's sentinel, `close`) or when its rank dies
    (DataLoader's watchdog checks the parent).
One training pass spans every step of the run (all epochs), so workers start once per run, which is
what `persistent_workers` gives an epoch loop; it stays off.

Errors: an item that fails in a worker (a DataError naming the row's file:line, RowTooLong, missing
media, a StorageError) is handed back and raised in the rank when the loop reaches that item, as the same
exception type with the same message (the worker's traceback as a note), exactly where the in-process
path raises it; `data.missingMedia: placeholder` works in the worker as in the rank (the placeholder
count the stages report comes from preflight.check, before step 0).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
import signal
import traceback
from collections.abc import Callable, Generator, Hashable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from mmalign.trainer import s3client

if TYPE_CHECKING:
    from mmalign.api.inputs import DataSource
    from mmalign.trainer.collate import Batch, Collator
    from mmalign.trainer.order import DataOrder

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Work:
    """One item of a pass: the pairs of one micro-batch (or block), and the key the consumer asks for it
    by (training: (step, micro, pair indices))."""

    key: Hashable
    pairs: list[Any]


class _TrainingItems(Sequence[Work]):
    """The micro-batches of optimizer steps start+1 .. total of one rank, as the training loop asks for
    them (loop.train_step: every micro-batch of `order.micro_batches(step, rank)` in turn). Computed
    lazily where the item is made (a worker), one step's micro-batches at a time."""

    def __init__(self, order: DataOrder, rank: int, start: int, total: int, pairs: Sequence[Any]) -> None:
        self.order, self.rank, self.start, self.pairs = order, rank, start, pairs
        self.length = max(0, total - start) * order.accumulation
        self._step: int | None = None
        self._micro_batches: list[list[int]] = []

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.length))]
        if not 0 <= index < self.length:
            raise IndexError(index)
        step, micro = divmod(index, self.order.accumulation)
        step += self.start
        if step != self._step:  # a step's micro-batches shuffle the epoch once, not once per micro-batch
            self._step, self._micro_batches = step, self.order.micro_batches(step, self.rank)
        indices = self._micro_batches[micro]
        return Work((step, micro, tuple(indices)), [self.pairs[i] for i in indices])


def training_items(
    order: DataOrder, rank: int, start: int, total: int, pairs: Sequence[Any]
) -> Sequence[Work]:
    """The training loop's micro-batches from step `start` (the step resumed at) to `total`, keyed
    (step, micro, tuple(pair indices)): what the stage's `loss_of(step, micro, indices)` asks for."""
    return _TrainingItems(order, rank, start, total, pairs)


def blocks(pairs: Sequence[Any], size: int) -> list[Work]:
    """Consecutive blocks of `size` pairs (the last may be shorter), keyed by their index."""
    return [
        Work(index, list(pairs[start : start + size]))
        for index, start in enumerate(range(0, len(pairs), size))
    ]


@dataclasses.dataclass
class _Failure:
    """An exception raised while making an item in a worker, carried back to the rank: its class, args
    and attributes (not the exception itself: pickle rebuilds an exception by calling its class with
    `args`, which fails for the ones with keyword-only fields, e.g. StoragePermanentError)."""

    kind: type[BaseException]
    args: tuple[Any, ...]
    state: dict[str, Any]
    trace: str

    @classmethod
    def of(cls, error: BaseException) -> _Failure:
        trace = traceback.format_exc()
        failure = cls(type(error), error.args, dict(vars(error)), trace)
        try:
            pickle.loads(pickle.dumps(failure))
        except Exception:  # an unpicklable attribute (a response object, a lock): keep the message
            failure = cls(RuntimeError, (f"{type(error).__name__}: {error}",), {}, trace)
        return failure

    def rebuilt(self) -> BaseException:
        error = self.kind.__new__(self.kind, *self.args)
        error.args = self.args
        vars(error).update(self.state)
        error.add_note(f"(raised in a DataLoader worker, data.loaderWorkers; its traceback:)\n{self.trace}")
        return error


class _Made(torch.utils.data.Dataset[tuple[Work, Any]]):
    """Item i -> (work, make(work.pairs)), or (work, _Failure): a failure travels as a value, so the
    DataLoader keeps its order and the rank raises it when it gets there."""

    def __init__(self, items: Sequence[Work], make: Callable[[list[Any]], Any]) -> None:
        self.items, self.make = items, make

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Work, Any]:
        work = self.items[index]
        try:
            return work, self.make(work.pairs)
        except Exception as error:
            return work, _Failure.of(error)


def _as_is(item: Any) -> Any:
    return item


def _init_worker(worker_id: int) -> None:
    """In each worker, before its first item (see the module docstring)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    s3client.forget_client()


class Prefetcher(Generic[T]):
    """One pass over `items`, each made by `make(work.pairs)` in `workers` worker processes,
    `prefetch` items ahead per worker (0 workers: made when asked, in this process), then `place`d
    (moved to the device) in this process. Iterate for (work, result) in order, or `take(key)` the next
    item checking it is the one asked for. Close it (or use `with`) to stop the workers."""

    def __init__(
        self,
        items: Sequence[Work],
        make: Callable[[list[Any]], T],
        workers: int = 0,
        prefetch: int = 2,
        place: Callable[[T], T] | None = None,
    ) -> None:
        self.items, self.make, self.workers, self.prefetch = items, make, workers, prefetch
        self.place = place
        self._stream: Generator[tuple[Work, T], None, None] | None = None
        self._loader_iterator: Any = None

    @classmethod
    def of(
        cls,
        items: Sequence[Work],
        collator: Collator,
        build: Callable[[Collator, list[Any]], Batch],
        data: DataSource,
    ) -> Prefetcher[Batch]:
        """Batches `build(collator, pairs)` (e.g. `collate.Collator.pairs`) with data.loaderWorkers and
        data.prefetchBatches: made with a CPU copy of the collator (a worker never touches the
        accelerator), moved to the collator's device here."""
        device = collator.device
        return Prefetcher(
            items,
            functools.partial(build, collator.on_cpu()),
            workers=data.loader_workers,
            prefetch=data.prefetch_batches,
            place=None if device is None else (lambda batch: batch.to(device)),
        )

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def __iter__(self) -> Generator[tuple[Work, T], None, None]:
        if self.workers <= 0 or len(self.items) == 0:
            for index in range(len(self.items)):
                work = self.items[index]
                yield work, self._placed(self.make(work.pairs))
            return
        # Tokenizers (Rust) warn in every forked child once the parent used its thread pool, and turn
        # it off there; saying so first keeps the logs clean (batches are tokenized text by text anyway).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        data_loader = torch.utils.data.DataLoader(
            _Made(self.items, self.make),
            batch_size=None,  # an item is already a micro-batch
            shuffle=False,
            num_workers=self.workers,
            prefetch_factor=self.prefetch,
            persistent_workers=False,  # one pass is the whole run (module docstring)
            collate_fn=_as_is,
            worker_init_fn=_init_worker,
            multiprocessing_context="fork",
            generator=torch.Generator(),  # not the global RNG (module docstring)
        )
        self._loader_iterator = iter(data_loader)
        try:
            for work, result in self._loader_iterator:
                if isinstance(result, _Failure):
                    raise result.rebuilt()
                yield work, self._placed(result)
        finally:
            self._stop_workers()

    def _placed(self, result: T) -> T:
        return self.place(result) if self.place is not None else result

    def take(self, key: Hashable) -> T:
        """The next item's result; it must be the one keyed `key` (the consumer and the items follow
        the same order, so anything else is a bug, said plainly rather than training on other pairs)."""
        if self._stream is None:
            self._stream = self.__iter__()
        try:
            work, result = next(self._stream)
        except StopIteration:
            raise RuntimeError(f"prefetch: asked for {key!r} after the last prefetched item") from None
        if work.key != key:
            raise RuntimeError(
                f"prefetch: the next prefetched item is {work.key!r}, the loop asked for {key!r}"
            )
        return result

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self._stream is not None:
            self._stream.close()  # runs the pass's `finally`
            self._stream = None
        self._stop_workers()

    def _stop_workers(self) -> None:
        iterator, self._loader_iterator = self._loader_iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)  # DataLoader's own, else on collection
        if shutdown is not None:
            shutdown()


__all__ = ["Prefetcher", "Work", "blocks", "training_items"]
