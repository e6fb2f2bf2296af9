"""Setup hook of the qwen2.5-0.5b-hh recipe: the SFT file the stages cannot read from the Hub directly.

trl-lib/hh-rlhf-helpful-base has conversational `prompt`, `chosen`, `rejected` columns. The RM stage reads
them as they are ({"prompt", "chosen", "rejected"}) and PPO reads `prompt` ({"prompt"} as a conversation),
but SFT wants {"prompt", "completion"}: this hook writes RUN/data/hh_sft.jsonl with completion = chosen.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DATASET = "trl-lib/hh-rlhf-helpful-base"


def setup(run_dir, build: bool = True, max_rows: int | None = None) -> dict[str, list[str]]:
    path = (Path(run_dir) / "data" / "hh_sft.jsonl").absolute()
    if build and not path.is_file():
        import datasets

        rows = datasets.load_dataset(DATASET, split="train")
        if max_rows:
            rows = rows.select(range(min(max_rows, len(rows))))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(
                    json.dumps({"prompt": row["prompt"], "completion": row["chosen"]}, ensure_ascii=False)
                    + "\n"
                )
        os.replace(tmp, path)
        print(f"qwen2.5-0.5b-hh: wrote {len(rows)} SFT rows to {path}")
    quoted = "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"
    return {"sft": [f"data.train={quoted}"]}
