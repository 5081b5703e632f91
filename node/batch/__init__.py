"""``dicom-node compress``: compress an existing archive with the daemon's rules and codecs.

The package is split by role:

- :mod:`node.batch.options` turns the command line into :class:`BatchOptions`
  (the rules come from a node config or from ``--transfer-syntax``);
- :mod:`node.batch.walk` lists the files of the given trees (no symbolic links
  followed, stale temp files of an interrupted run removed);
- :mod:`node.batch.journal` is the SQLite journal that makes a run resumable;
- :mod:`node.batch.work` is what a worker process does with one file (read, match,
  compress, write beside the original, rename over it);
- :mod:`node.batch.dicomdir` keeps a DICOMDIR's records true to the files;
- :mod:`node.batch.progress` and :mod:`node.batch.report` say what happened;
- :mod:`node.batch.run` ties them together.
"""
