"""`lxmert-tsv`: LXMERT's features (mscoco_imgfeat/train2014_obj36.tsv, vg_gqa_obj36.tsv, ...).

One image a line, no header, ten tab-separated fields: img_id, img_h, img_w (note: height first),
objects_id (base64 int64, K), objects_conf (float32, K), attrs_id (int64, K), attrs_conf (float32, K),
num_boxes, boxes (float32, K x 4), features (float32, K x D). Object and attribute ids are 0-based
over the 1600 classes / 400 attributes (the argmax over columns 1: of the detector's distributions);
ours are 1-based, so 1 is added. The source has no class distributions (cls_prob).
"""

from __future__ import annotations

import numpy as np

from pipelines.feature_formats.common import Entry, Record, b64_array, ids_and_conf, rows, to_int
from pipelines.feature_formats.tsv import TsvReader


class LxmertTsvReader(TsvReader):
    """Reader of LXMERT's 10-field TSV."""

    name = "lxmert-tsv"

    def decode(self, entry: Entry) -> Record:
        """Decode one line."""
        f = self.split(entry, (10,))
        k = to_int(f[7], "num_boxes")
        return Record(
            raw_id=f[0].decode("utf-8", "replace"),
            width=to_int(f[2], "img_w"),
            height=to_int(f[1], "img_h"),
            boxes=rows(b64_array(f[8], "boxes"), k, 4, "boxes"),
            features=rows(b64_array(f[9], "features"), k, None, "features"),
            objects=ids_and_conf(
                b64_array(f[3], "objects_id", np.int64), b64_array(f[4], "objects_conf"), k, "objects"
            ),
            attributes=ids_and_conf(
                b64_array(f[5], "attrs_id", np.int64), b64_array(f[6], "attrs_conf"), k, "attrs"
            ),
        )
