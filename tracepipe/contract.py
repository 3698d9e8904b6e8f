"""The runtime's reserved columns: the one place their names are defined.

Columns starting with ``_`` belong to the runtime and never reach an output. Every module that
reads or writes one imports its name from here (``pipeline/keys.py``, ``pipeline/store.py`` and
``stages/base.py`` re-export the names they used to define, for older imports).

==============  =====================================================================================
``_key``        a row's identity (source rows: ``<source>:<id>``; a fan-out stage's output rows:
                ``<parent _key>/<stage>:<i>``)
``_parent``     the ``_key`` of the row a fan-out row came from (lineage)
``_ord``        stable row order, as a set stage sees it
``_in_key``     row key of a row stage's input row: hash of exactly the columns the stage reads
``_idx``        index of an output row among those one input row gave (store only)
``_drop``       a stage's reason to reject a row (null: kept)
``_error``      a row's error (the row is quarantined; also a bad source line's reason)
``_reason``     why a row in ``<workdir>/rejects/`` was dropped (its ``_drop``)
``_stage``      the stage that dropped (``rejects/``) or quarantined (``quarantine/``) a row
==============  =====================================================================================
"""

from __future__ import annotations

KEY_COL = "_key"
PARENT_COL = "_parent"
ORDER_COL = "_ord"
IN_KEY_COL = "_in_key"
IDX_COL = "_idx"
DROP_COL = "_drop"
ERROR_COL = "_error"
REASON_COL = "_reason"
STAGE_COL = "_stage"

#: the prefix of every runtime column (data columns never start with it)
RUNTIME_PREFIX = "_"
RESERVED_COLUMNS = (KEY_COL, PARENT_COL, ORDER_COL, IN_KEY_COL, IDX_COL, DROP_COL, ERROR_COL, REASON_COL, STAGE_COL)


def is_runtime_column(name: str) -> bool:
    """Whether a column belongs to the runtime (its name starts with ``_``)."""
    return name.startswith(RUNTIME_PREFIX)
