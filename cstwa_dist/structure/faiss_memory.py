"""What graph mining puts on a rank's GPU when faiss-gpu is present: the one home of that rule.

Why a module of its own: ``structure/ivf.py`` moves the shard's IVF lists to the GPU
(``index_cpu_to_gpu``) and runs the exact search with ``knn_gpu`` when Faiss sees a GPU, and Faiss
then keeps a temporary-memory stack on that GPU (``StandardGpuResources``). The TorchRec planner of
the job that mines (``train/reserves.py``) must keep that memory away from the tables, so the
figure must be the one the step uses. The temporary memory is a constant the step should set
explicitly (:data:`FAISS_GPU_TEMP_BYTES`): Faiss's own default has changed between releases (18 % of
the device in old ones, 1.5 GiB on large GPUs in newer ones), and a default the code does not state
cannot be planned for. The index's bytes are :func:`~cstwa_dist.structure.ivf.knn_memory`'s own
items, re-homed from the host to the device, never re-derived here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cstwa_dist.structure.memory import MemoryItem

if TYPE_CHECKING:
    from cstwa_dist.structure.ivf import IVFParams

__all__ = ["FAISS_GPU_TEMP_BYTES", "knn_device_memory"]

#: Faiss's temporary-memory stack on a rank's GPU during graph mining (query and result copies and
#: the search's scratch live in it). ``ivf._gpu_resources`` should pass it to
#: ``StandardGpuResources.setTempMemory`` so the step allocates what the planner reserves.
FAISS_GPU_TEMP_BYTES = 1536 * 1024**2


def knn_device_memory(
    params: IVFParams, n_total: int, rows: int, d: int, k: int, *, block_rows: int | None = None
) -> list[MemoryItem]:
    """Device memory of ``distributed_knn`` on a GPU rank holding ``rows`` of ``n_total`` rows.

    * IVF: the shard's lists and centroids (``knn_memory``'s ``index`` item): ``index_cpu_to_gpu``
      copies them to the GPU, and the host copy is reset afterwards;
    * exact search: the normalised shard (``knn_memory``'s ``shard`` item), which ``knn_gpu`` copies
      to the GPU as the base of every flat search;
    * Faiss's temporary memory, :data:`FAISS_GPU_TEMP_BYTES`, fixed whatever ``N`` and ``W``.

    Per rank ``O(n_r·w)`` plus a constant; nothing of size ``N``. ``block_rows``: the ring's query
    block (default ``ivf.BLOCK_ROWS``).
    """
    # imported here so that ivf.py can import FAISS_GPU_TEMP_BYTES from this module without a cycle
    from cstwa_dist.structure.ivf import BLOCK_ROWS, knn_memory

    items = {i.key: i for i in knn_memory(params, n_total, rows, d, k, block_rows=block_rows or BLOCK_ROWS)}
    held = items["index"] if "index" in items else items["shard"]
    return [
        MemoryItem(held.key, held.name + " (on the GPU)", held.bytes, held.formula, held.detail),
        MemoryItem("faiss_temp", "Faiss GPU temporary memory", FAISS_GPU_TEMP_BYTES, "T = 1.5 GiB"),
    ]
