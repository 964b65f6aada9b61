"""The dataset library behind ``DatasetSensor`` and ``DatasetTrigger``.

Imports run one way: :mod:`.location` (URIs and globs) <- :mod:`.listing` (S3 and local listings, the
error taxonomy) <- :mod:`.listing_coordinator` and :mod:`.completeness` (criteria, the one-shot check);
:mod:`.s3_client_pool` stands alone. The trigger and the sensor import from here, never the reverse.
"""

from __future__ import annotations
