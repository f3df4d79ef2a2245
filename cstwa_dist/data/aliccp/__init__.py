"""Ali-CCP importer: the raw Tianchi files -> the project's dataset layout, following the AITM protocol.

Input (``docs/method.md §6``), four files without header in ``raw``:

* ``sample_skeleton_{train,test}.csv``: ``sample_id,click,purchase,common_feature_key,feature_count,
  feature_list`` — one impression per line;
* ``common_features_{train,test}.csv``: ``key,feature_count,feature_list`` — features shared by many
  impressions (the user profile of a request), joined to samples by ``common_feature_key``.

Each may also be ``<name>.gz`` (the release is distributed compressed; gzip is found by its magic bytes,
and decompressed on the fly in every pass, :mod:`.chunks`); a UTF-8 byte-order mark before a file's first
line is skipped.

The package is cut along the import's seams, each module saying why it is the way it is:

* :mod:`.fields` — which fields are kept (:data:`DEFAULT_FIELDS`) and their sides;
* :mod:`.chunks` — byte-range chunks of whole lines, the unit of work;
* :mod:`.parse` — per-line checks and raw ids of the kept fields;
* :mod:`.join` — the in-memory common-features table and the join by key;
* :mod:`.split` — the validation split (:func:`val_mask`), a hash of the line number;
* :mod:`.vocab` — id counts on train, the ``min_count`` filter and the dense :func:`remap`;
* :mod:`.release` — what is known of the official files, and the warnings for a file that looks cut;
* :mod:`.tasks` — the pure chunk functions; :mod:`.executor` — runs them in process or as Ray tasks;
* :mod:`.passes` — the driver's consumption of each pass; :mod:`.importer` — :func:`import_aliccp`.

Files are written by :class:`cstwa_dist.data.writer.SplitAccumulator` (row-group aligned, so files depend
only on the row sequence) inside :func:`cstwa_dist.data.quarantine.staged_import`, like the CSV
importer's. Progress lines and peak RSS come from :mod:`cstwa_dist.data.progress`.

Protocol (AITM, which the paper follows): ids are counted on the *train* split (after the validation
split is cut off, so no validation line shapes the vocabulary); an id seen fewer than ``min_count`` times
becomes 0 (unknown), the others become ``1..V`` in increasing raw-id order (vocab size ``V + 1``). A field
missing on a sample is 0. Validation is a random ``val_fraction`` of the train file; the official test
file is the test split. The raw id -> row mapping is written as table vocabularies in ``<out>/vocab/``
(:mod:`cstwa_dist.data.vocab`); ``vocab_from`` (``--vocab-from``) keeps an earlier import's rows and
appends the ids new in this one (``docs/data-days.md``).

Memory: the one thing held is the common-features table of the file being joined (:mod:`.join`), plus the
per-field id counts of train and the kept-id arrays. Files are read in byte-range chunks of whole lines
(``chunk_bytes``), never whole. The peak RSS of the importing process (and, in parallel, of the busiest
Ray worker) is logged and stored in ``stats.json`` (``extra.peak_rss_mb``).

Parallel (``parallel=True``, or auto above :data:`PARALLEL_THRESHOLD_BYTES` of input): the same chunk
function runs as Ray tasks over the byte ranges, the common table is shared once through the object
store, and the driver consumes results in chunk order with a bounded window of tasks in flight.
Everything that decides the output is a function of the line, so the parallel and the single-process
paths write identical files, whatever the chunk size.

Validation that loses nothing (:mod:`cstwa_dist.data.quarantine`). Reasons, the first problem found in
this order naming a line: ``wrong_column_count``; ``bad_label`` (click/purchase not 0/1);
``purchase_without_click``; ``bad_feature_list`` (an entry not ``field\\x02id\\x03value``, or
``feature_count`` disagreeing with the entries); ``non_integer_id`` (a kept field's id is not a
non-negative decimal integer; ids of fields that are not kept are checked for syntax only);
``repeated_field`` (a kept field more than once on a line, or both on the sample and in its common
features); ``unknown_common_key``; ``common_features_quarantined`` (the key's common line was itself
quarantined). In either file, a last line without a final newline that fails a check is
``truncated_line`` instead (the file was cut mid-line), and the import logs a loud warning naming the
file (:mod:`.release`, which also compares the files' line counts with the release's known figures).
Common-feature lines: ``wrong_column_count``, ``bad_key`` (empty key), ``bad_feature_list``,
``non_integer_id``, ``repeated_field``, ``duplicate_common_key`` (a key seen on an earlier line, which is
the one kept). Bad sample lines go to the quarantine of the split their line number is assigned to; bad
common lines to that of the file's split (train or test). Per file, ``input_lines = written +
quarantined`` (for a common file, ``written`` = keys kept), asserted at the end and recorded under
``extra.input_files``; each split also records its own share (``input_lines``, ``written``,
``quarantined``, ``quarantine``).

Bad input stops early, with one error line and nothing at ``out`` (:func:`import_aliccp`): a missing raw
file (under neither name), a folder or another archive format in its place, an empty raw file, a gzip
file that cannot be read to its end, a field id not in :data:`DEFAULT_FIELDS` or
:data:`MULTI_VALUED_FIELDS`, a kept field on no train line, an empty split, and more than
``max_quarantine_fraction`` of any file or split quarantined (checked after each file's pass; the bad
lines are then kept in ``<out>.quarantine/``).
"""

from cstwa_dist.data.aliccp.fields import (
    CONTEXT_FIELDS,
    DEFAULT_FIELDS,
    FILES,
    ITEM_FIELDS,
    ITEM_ID_FIELD,
    MULTI_VALUED_FIELDS,
    USER_FIELDS,
    USER_ID_FIELD,
    field_side,
)
from cstwa_dist.data.aliccp.importer import DEFAULT_CHUNK_BYTES, PARALLEL_THRESHOLD_BYTES, import_aliccp
from cstwa_dist.data.aliccp.join import CommonTable
from cstwa_dist.data.aliccp.split import val_mask
from cstwa_dist.data.aliccp.vocab import remap

__all__ = [
    "CONTEXT_FIELDS",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_FIELDS",
    "FILES",
    "ITEM_FIELDS",
    "ITEM_ID_FIELD",
    "MULTI_VALUED_FIELDS",
    "PARALLEL_THRESHOLD_BYTES",
    "USER_FIELDS",
    "USER_ID_FIELD",
    "CommonTable",
    "field_side",
    "import_aliccp",
    "remap",
    "val_mask",
]
