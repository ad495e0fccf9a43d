"""The extract stage: run the teacher once over every image and caption and write the feature store.

Work is cut into *units*: one chunk of one array (`<split>/image_emb` or `<split>/text_emb`, `chunk_rows`
rows each, exactly the store's chunk files). A unit is computed, written durably (temp file, fsync,
rename), and only then marked done by a small marker file `.extract/done/<split>/<array>.<i>.json`. So:

- **Resume**: a run killed at any moment (SIGKILL included) loses at most the unit each rank was computing;
  the rerun skips every unit with a marker. Batches never straddle units and always start at a unit's
  first row, so a unit's rows do not depend on which run, rank or neighbour computed it: the finished
  store is bitwise identical to an uninterrupted run's (same device, same settings).
- **Identity**: the store attrs hold the teacher's identity, the dataset {name, fingerprint} and the
  extract settings that shape the rows (`extract`: compute dtype, device type, chunk rows, JPEG draft);
  the store dtype and splits are attrs of their own. A partial store whose identity differs is never
  resumed: one line says what differs and the run starts over. Batch sizes and worker counts are speed
  settings only and may change between a run and its resumption, and so may `on_bad_image` (a run that
  stopped on a bad image resumes with `skip`; a `skip` record met under `error` stops the run).
- **Ranks** (torchrun): rank 0 prepares the store, every rank reads the markers, the *pending* units are
  dealt round-robin (`pending[rank::world]`), each rank writes only its own chunk files and markers (no
  shared file is ever read-modified-written), and rank 0 finalizes after a barrier.
- **Bad images** (`on_bad_image`): `error` stops with one line naming the file; `skip` drops the image
  *and its captions* from that split's arrays at finalization (the rows are compacted, `text_image` is
  renumbered, `image_id` keeps naming the kept images) and lists each skipped image in the store attrs
  `skipped_images` ({split, index_row, image_id, path, reason}). A store with skips therefore has fewer
  rows than the index split: align it with the index (or the image cache) through `image_id`, or drop
  the listed `index_row`s from the index side.
- **Finalization** (rank 0): compaction (only if something was skipped; crash-safe, it builds the new
  split under `.extract/compact/` and swaps it in by renames), then `complete=true`, then `.extract/` is
  deleted, so a finished store holds nothing but the Zarr group.
- **Unpaired items** (pipeline.data.index): an image without captions is an ordinary image_emb row; the
  texts of a split that have no image are embedded like captions into the optional
  `<split>/unpaired_text_emb` array (units of their own), which is created only when there are some.
- A *complete* store found at the start is rewritten from scratch (a stage rewrites its output; DVC
  only reruns the stage when an input changed), except when the only difference is image files replaced
  since (issue 13): each image unit records the index's digest of the files it embedded (`Unit.content`,
  in its marker, then the store attrs `image_chunks`), and a store whose identity matches and which skipped
  no image is reopened with every unit marked done under its recorded digest, so that exactly the units
  whose digest differs are computed again. A resumed partial store redoes such units the same way.
- **A complete store is never cleared first** (kdpipe never deletes what it did not write, nor its own output
  before the new one is complete): its rewrite goes to `.NAME.next` beside it (`units.staging_dir`; for the
  stale chunks alone, a hard-linked copy: every write replaces a file by rename, so the store never changes)
  and is swapped in whole once complete (`finalize.publish`). A whole rewrite first checks that the disk
  holds a second store. A kill or a full disk leaves the complete store as it was; the rerun resumes the
  rewrite beside it. Anything at `out` that is not a feature store is refused (ownership.claim).

Speed: images are decoded and preprocessed by `num_workers` DataLoader processes (pinned memory, deep
prefetch, non-blocking copies); the device result of batch k is fetched only after batch k+1 has been
queued; captions are bucketed by token length inside each unit (sorted, batched, scattered back to their
rows), so most batches are far shorter than the maximum length; chunk files are written by a background
thread. Everything runs under `torch.inference_mode()`.

The package, in the order a run goes through it: config.py (the section), distributed.py (devices and ranks),
units.py (planning the units), resume.py (resuming, reopening or starting over; the markers), passes.py (what
both passes share: loader processes, results fetched a batch late, the thread that commits units), images.py
(the image pass), texts.py (the text pass), finalize.py (checksums, compaction, complete=true), run.py
(`run_extract`, the stage). The teachers themselves live in pipeline/teachers/.
"""
