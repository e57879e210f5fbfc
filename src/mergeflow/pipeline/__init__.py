"""The pipeline's stage functions: ``run(cfg, paths)`` does the I/O around the library's pure code."""
