"""Run clip-retrieval's own ClipClient, in its venv, against a knn back end (ours).

    .venv-peers/clip_client/bin/python bench/peers/clip_client_run.py URL INDICE QUERIES

QUERIES is a JSON list of {"text": ...} or {"image": path}, each with optional ClipClient
arguments ("modality": "image" | "text", "num_images", "deduplicate", ...). Prints one JSON
list: per query, what ``ClipClient(url, indice_name, ...).query(...)`` returned.

``import clip_retrieval.clip_client`` would run the package's __init__, which imports its back
end (flask, faiss, torch); clip_client.py itself needs only requests, so it is loaded as a file
from the installed distribution, unchanged.
"""

import importlib.metadata
import importlib.util
import json
import sys


def load_clip_client():
    path = importlib.metadata.distribution("clip-retrieval").locate_file(
        "clip_retrieval/clip_client.py")
    spec = importlib.util.spec_from_file_location("clip_client", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    url, indice, queries = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    cc = load_clip_client()
    out = []
    for q in queries:
        q = dict(q)
        kwargs = {k: q.pop(k) for k in ("text", "image", "embedding_input") if k in q}
        if "modality" in q:
            q["modality"] = cc.Modality(q["modality"])
        client = cc.ClipClient(url=url, indice_name=indice, **q)
        out.append(client.query(**kwargs))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
